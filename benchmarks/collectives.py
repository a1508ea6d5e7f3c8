"""Wrapper overhead of devlayer's collectives against raw ``torch.distributed``.

Run (CPU/gloo here; unchanged on GPUs, where ``devlayer.device()`` is the accelerator)::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node=2 benchmarks/collectives.py
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node=2 -m benchmarks.collectives --quick
    ... --json benchmarks/results/collectives.jsonl   # raw records, one JSON object per line

Sections, all in one run:

1. ``all_reduce`` of one float32 tensor, 4 B .. 64 MiB: ``devlayer.all_reduce(t)`` vs
   ``dist.all_reduce(t)``. ``all_gather`` (``same_shape=True`` and the default, uneven-capable
   form) vs ``dist.all_gather_single``/``all_gather_into_tensor``, and ``broadcast`` vs
   ``dist.broadcast``, for a few sizes.
2. The mean of a dict of 64 scalar tensors: ``devlayer.all_reduce(d, op="mean")`` vs a
   per-key ``dist.all_reduce`` + divide loop vs a hand-flattened ``torch.stack`` + one
   ``all_reduce`` + divide.

Method: every implementation gets warm-up calls, then a calibrated number of calls per
timed block so that one block lasts about ``--block-s`` seconds. A block starts after a
barrier (and a device synchronize on accelerators) and ends after a synchronize; it is timed
with ``time.perf_counter`` on every rank and the slowest rank's time is kept. Within each
repeat the implementations run interleaved, and the order alternates between repeats
(raw, devlayer | devlayer, raw | ...), so drift hits both alike. Tables give the median of
the repeats with the min-max range; overhead is the median of the per-repeat paired ratios
``devlayer / raw - 1``.

This is a benchmark that prints tables, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

import devlayer

KiB = 1024
MiB = 1024 * KiB

# Targets printed next to the results (see docs/performance.md).
TARGET_OVERHEAD_LARGE = 0.05  # at >= 1 MiB
TARGET_OVERHEAD_SMALL = 0.15  # at 4 B
TARGET_DICT_SPEEDUP = 20.0  # coalesced vs per-key loop
TARGET_DICT_VS_FLAT = 1.10  # coalesced / hand-flattened

N_METRICS = 64

Impl = tuple[str, Callable[[], object]]


# --------------------------------------------------------------------------- timing


class Bench:
    """Times interleaved implementations across ranks and keeps the records."""

    def __init__(self, *, repeats: int, block_s: float, warmup: int, max_iters: int) -> None:
        self.repeats = repeats
        self.block_s = block_s
        self.warmup = warmup
        self.max_iters = max_iters
        self.device = devlayer.device()
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.records: list[dict[str, Any]] = []
        # torch.accelerator exists on torch >= 2.6; CPU needs no synchronize.
        self._sync_fn = (
            torch.accelerator.synchronize
            if self.device.type != "cpu" and hasattr(torch, "accelerator")
            else None
        )

    def sync(self) -> None:
        if self._sync_fn is not None:
            self._sync_fn()

    def _max_over_ranks(self, values: list[float]) -> list[float]:
        """Element-wise max over ranks, done outside any timed region."""
        buf = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(buf, op=dist.ReduceOp.MAX)
        return buf.tolist()

    def _block(self, fn: Callable[[], object], iters: int) -> float:
        dist.barrier()
        self.sync()
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        self.sync()
        return time.perf_counter() - start

    def _calibrate(self, impls: list[Impl]) -> list[int]:
        """Warm every implementation up, then pick its calls per block (same on every rank)."""
        for _, fn in impls:
            for _ in range(self.warmup):
                fn()
        probe = []
        for _, fn in impls:
            n = 3
            probe.append(self._block(fn, n) / n)
        per_call = self._max_over_ranks(probe)
        return [max(3, min(self.max_iters, int(self.block_s / max(s, 1e-9)))) for s in per_call]

    def run(self, section: str, case: dict[str, Any], impls: list[Impl]) -> dict[str, list[float]]:
        """Time ``impls`` ``repeats`` times each, interleaved; return µs per call per impl."""
        iters = dict(zip([name for name, _ in impls], self._calibrate(impls), strict=True))
        times: dict[str, list[float]] = {name: [] for name, _ in impls}
        for rep in range(self.repeats):
            order = impls if rep % 2 == 0 else impls[::-1]
            local = [self._block(fn, iters[name]) for name, fn in order]
            slowest = self._max_over_ranks(local)
            for (name, _), t_local, t_max in zip(order, local, slowest, strict=True):
                n = iters[name]
                times[name].append(t_max / n * 1e6)
                self.records.append(
                    {
                        "type": "result",
                        "section": section,
                        **case,
                        "impl": name,
                        "repeat": rep,
                        "iters": n,
                        "us_per_call": t_max / n * 1e6,
                        "us_per_call_rank0": t_local / n * 1e6,
                    }
                )
        return times


# --------------------------------------------------------------------------- statistics


def med_range(values: list[float], fmt: str = "{:.1f}") -> str:
    return (
        f"{fmt.format(statistics.median(values))} "
        f"[{fmt.format(min(values))}, {fmt.format(max(values))}]"
    )


def paired(a: list[float], b: list[float]) -> list[float]:
    """Per-repeat ratios a/b (the implementations ran next to each other in each repeat)."""
    return [x / y for x, y in zip(a, b, strict=True)]


def pct_range(ratios: list[float]) -> str:
    over = [(r - 1.0) * 100 for r in ratios]
    return f"{statistics.median(over):+.1f} % [{min(over):+.1f}, {max(over):+.1f}]"


def fmt_bytes(n: int) -> str:
    if n >= MiB:
        return f"{n // MiB} MiB"
    if n >= KiB:
        return f"{n // KiB} KiB"
    return f"{n} B"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- sections


def bench_all_reduce(b: Bench, sizes: list[int]) -> str:
    rows = []
    for nbytes in sizes:
        # Zeros: a repeated in-place SUM stays 0, so no inf/NaN/denormal slows later calls.
        t = torch.zeros(nbytes // 4, dtype=torch.float32, device=b.device)
        impls: list[Impl] = [
            ("raw", lambda t=t: dist.all_reduce(t)),
            ("devlayer", lambda t=t: devlayer.all_reduce(t)),
        ]
        times = b.run("all_reduce", {"bytes": nbytes, "dtype": "float32"}, impls)
        ratios = paired(times["devlayer"], times["raw"])
        target = _overhead_target(nbytes)
        ok = "n/a" if target is None else _mark(statistics.median(ratios) - 1 <= target)
        rows.append(
            [
                fmt_bytes(nbytes),
                med_range(times["raw"]),
                med_range(times["devlayer"]),
                pct_range(ratios),
                "n/a" if target is None else f"<= {target * 100:.0f} % {ok}",
            ]
        )
    head = ["size", "raw µs/call", "devlayer µs/call", "overhead", "target"]
    return "### all_reduce (float32, op=sum)\n\n" + table(head, rows)


def _overhead_target(nbytes: int) -> float | None:
    if nbytes >= MiB:
        return TARGET_OVERHEAD_LARGE
    if nbytes <= 4:
        return TARGET_OVERHEAD_SMALL
    return None


def _mark(ok: bool) -> str:
    return "met" if ok else "MISSED"


def bench_all_gather(b: Bench, sizes: list[int]) -> str:
    # torch 2.13 renamed all_gather_into_tensor to all_gather_single; older torch has the old name.
    gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    rows = []
    for nbytes in sizes:
        t = torch.ones(nbytes // 4, dtype=torch.float32, device=b.device)
        n_out = t.numel() * b.world

        def raw(t: torch.Tensor = t, n_out: int = n_out) -> object:
            # Allocates its output per call, as devlayer has to.
            out = torch.empty(n_out, dtype=t.dtype, device=t.device)
            gather_into(out, t)
            return out

        impls: list[Impl] = [
            ("raw", raw),
            ("devlayer_same_shape", lambda t=t: devlayer.all_gather(t, same_shape=True)),
            ("devlayer_default", lambda t=t: devlayer.all_gather(t)),
        ]
        times = b.run("all_gather", {"bytes": nbytes, "dtype": "float32"}, impls)
        rows.append(
            [
                fmt_bytes(nbytes),
                med_range(times["raw"]),
                med_range(times["devlayer_same_shape"]),
                pct_range(paired(times["devlayer_same_shape"], times["raw"])),
                med_range(times["devlayer_default"]),
                pct_range(paired(times["devlayer_default"], times["raw"])),
            ]
        )
    head = [
        "size per rank",
        "raw µs/call",
        "same_shape=True µs",
        "overhead",
        "default (uneven) µs",
        "overhead",
    ]
    name = gather_into.__name__
    return f"### all_gather (float32; raw = dist.{name} into a fresh tensor)\n\n" + table(
        head, rows
    )


def bench_broadcast(b: Bench, sizes: list[int]) -> str:
    rows = []
    for nbytes in sizes:
        t = torch.ones(nbytes // 4, dtype=torch.float32, device=b.device)
        impls: list[Impl] = [
            ("raw", lambda t=t: dist.broadcast(t, src=0)),
            ("devlayer", lambda t=t: devlayer.broadcast(t, src=0)),
        ]
        times = b.run("broadcast", {"bytes": nbytes, "dtype": "float32"}, impls)
        ratios = paired(times["devlayer"], times["raw"])
        rows.append(
            [
                fmt_bytes(nbytes),
                med_range(times["raw"]),
                med_range(times["devlayer"]),
                pct_range(ratios),
            ]
        )
    head = ["size", "raw µs/call", "devlayer µs/call", "overhead"]
    return "### broadcast (float32, src=0)\n\n" + table(head, rows)


def bench_metric_dict(b: Bench) -> str:
    world = b.world
    gen = torch.Generator().manual_seed(1234 + b.rank)
    # op="mean" of the same values on every call converges and stays finite.
    metrics = {
        f"metric_{i:02d}": torch.rand((), generator=gen).to(b.device) for i in range(N_METRICS)
    }

    def per_key() -> object:
        for v in metrics.values():
            dist.all_reduce(v)
            v.div_(world)
        return metrics

    def flattened() -> object:
        buf = torch.stack(list(metrics.values()))
        dist.all_reduce(buf)
        buf.div_(world)
        return dict(zip(metrics, buf.unbind(), strict=True))

    values = list(metrics.values())

    def flattened_in_place() -> object:
        # Context row: also writes the results back into the caller's tensors, as
        # devlayer.all_reduce promises ("tensors are updated in place").
        buf = torch.stack(values)
        dist.all_reduce(buf)
        buf.div_(world)
        torch._foreach_copy_(values, buf.unbind())
        return metrics

    impls: list[Impl] = [
        ("per_key_loop", per_key),
        ("hand_flattened", flattened),
        ("hand_flattened_in_place", flattened_in_place),
        ("devlayer", lambda: devlayer.all_reduce(metrics, op="mean")),
    ]
    times = b.run("metric_dict", {"n_scalars": N_METRICS, "dtype": "float32"}, impls)
    speedup = paired(times["per_key_loop"], times["devlayer"])
    vs_flat = paired(times["devlayer"], times["hand_flattened"])
    med_speedup = statistics.median(speedup)
    med_vs_flat = statistics.median(vs_flat)
    in_place_cost = paired(times["hand_flattened_in_place"], times["hand_flattened"])
    rows = [
        ["per-key loop (64 x dist.all_reduce + div_)", med_range(times["per_key_loop"]), "", ""],
        ["hand-flattened (stack, 1 all_reduce, div_)", med_range(times["hand_flattened"]), "", ""],
        [
            "context: hand-flattened + in-place write-back (_foreach_copy_)",
            med_range(times["hand_flattened_in_place"]),
            "",
            f"{med_range(in_place_cost, '{:.2f}')}x",
        ],
        [
            'devlayer.all_reduce(dict, op="mean")',
            med_range(times["devlayer"]),
            f"{med_range(speedup, '{:.1f}')}x "
            f"(target >= {TARGET_DICT_SPEEDUP:.0f}x: {_mark(med_speedup >= TARGET_DICT_SPEEDUP)})",
            f"{med_range(vs_flat, '{:.2f}')}x "
            f"(target <= {TARGET_DICT_VS_FLAT:.1f}x: {_mark(med_vs_flat <= TARGET_DICT_VS_FLAT)})",
        ],
    ]
    head = ["implementation", "µs/call", "speedup vs per-key loop", "ratio vs hand-flattened"]
    return f"### mean of a dict of {N_METRICS} float32 scalar tensors\n\n" + table(head, rows)


# --------------------------------------------------------------------------- environment


def environment(st: devlayer.State) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "type": "environment",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "cpu_model": cpu,
        "cpu_cores": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "devlayer": devlayer.__version__,
        "backend": st.backend,
        "device": str(st.device),
        "comm": st.comm,
        "world_size": st.world_size,
        "loadavg_start": _loadavg(),
    }


def _loadavg() -> str | None:
    """The 1/5/15-minute load average: other work on the machine shows up as noise."""
    try:
        with open("/proc/loadavg", encoding="utf-8") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return None


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer sizes, repeats and iterations")
    p.add_argument("--json", metavar="PATH", help="write raw records (JSON lines) to PATH")
    p.add_argument("--repeats", type=int, help="timed repeats per case (default 15; quick: 5)")
    p.add_argument(
        "--block-s", type=float, help="target seconds per timed block (default 0.08; quick 0.03)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    st = devlayer.init()
    try:
        if st.world_size < 2:
            print(
                "benchmarks/collectives.py compares collectives between ranks; start it with "
                "torchrun --standalone --nproc-per-node=2 benchmarks/collectives.py",
                file=sys.stderr,
            )
            return 2
        if args.quick:
            ar_sizes = [4, 4 * KiB, 1 * MiB, 16 * MiB]
            side_sizes = [4, 1 * MiB]
            repeats, block_s, warmup, max_iters = 5, 0.03, 3, 500
        else:
            ar_sizes = [4**k for k in range(1, 14)]  # 4 B .. 64 MiB
            side_sizes = [4, 4 * KiB, 1 * MiB, 16 * MiB]
            repeats, block_s, warmup, max_iters = 15, 0.08, 10, 5000
        b = Bench(
            repeats=args.repeats or repeats,
            block_s=args.block_s or block_s,
            warmup=warmup,
            max_iters=max_iters,
        )
        env = environment(st)
        t0 = time.perf_counter()
        sections = [
            bench_all_reduce(b, ar_sizes),
            bench_metric_dict(b),
            bench_all_gather(b, side_sizes),
            bench_broadcast(b, side_sizes),
        ]
        env["wall_s"] = round(time.perf_counter() - t0, 1)
        env["loadavg_end"] = _loadavg()
        env["repeats"] = b.repeats
        env["block_s"] = b.block_s
        env["quick"] = args.quick
        if st.is_main:
            print(_report(env, sections))
            if args.json:
                _write_json(args.json, env, b.records)
        return 0
    finally:
        devlayer.shutdown()


def _report(env: dict[str, Any], sections: list[str]) -> str:
    head = (
        f"## devlayer collectives benchmark ({'quick' if env['quick'] else 'full'})\n\n"
        f"{env['date_utc']} · {env['cpu_model']} ({env['cpu_cores']} cores) · "
        f"backend {env['backend']} ({env['device']}) · comm {env['comm']} · "
        f"world {env['world_size']} · torch {env['torch']} · devlayer {env['devlayer']} · "
        f"python {env['python']} · OMP_NUM_THREADS={env['omp_num_threads']} · "
        f"load average {env['loadavg_start']} (start), {env['loadavg_end']} (end)\n\n"
        f"Times: µs per call, slowest rank, median of {env['repeats']} interleaved repeats "
        f"[min, max]. Overhead: median [min, max] of per-repeat devlayer/raw - 1. "
        f"Targets: overhead <= {TARGET_OVERHEAD_SMALL * 100:.0f} % at 4 B, "
        f"<= {TARGET_OVERHEAD_LARGE * 100:.0f} % at >= 1 MiB; metric dict >= "
        f"{TARGET_DICT_SPEEDUP:.0f}x the per-key loop and <= {TARGET_DICT_VS_FLAT:.1f}x "
        f"hand-flattened.\n"
    )
    return "\n\n".join([head, *sections, f"Benchmark wall time: {env['wall_s']} s\n"])


def _write_json(path: str, env: dict[str, Any], records: list[dict[str, Any]]) -> None:
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for rec in [env, *records]:
            f.write(json.dumps(rec) + "\n")
    print(f"wrote {len(records) + 1} records to {path}")


if __name__ == "__main__":
    sys.exit(main())
