"""What the collective ledger (issue 22) costs per ``all_reduce``, and where the time goes.

Run (2 ranks; CPU/gloo here)::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node=2 -m benchmarks.ledger
    ... --runs 5 --sizes 4,1048576 --repeats 5 --rounds 6 --block-s 0.03

A narrow interval for one size (measurement 4 alone, three arms, many chunks; each row is
also printed to stderr as soon as it is measured)::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node=2 -m benchmarks.ledger \
        --skip 1,2,3,5 --sizes 1048576 --no-float \
        --arms ledger_on,ledger_off_again,spin --chunks 150

Three measurements, each printed as a table (rank 0):

1. **In situ**: the ledger's ``begin`` timed with ``perf_counter_ns`` inside real
   ``devlayer.all_reduce`` calls at 4 B (one sample per call, the median of each block; the
   median [min, max] over blocks), for the call-site search before issue 22's cost work
   (every frame from the caller up, ``f_lineno``) and the current one (a depth hint that
   jumps to the user's frame, ``f_lasti``), next to the same ``begin`` called in a hot loop
   from a frame outside devlayer (what "timed alone" measured). An empty ``begin`` gives the
   timer's own cost, which is subtracted.
2. **CPU time per call** of the calling thread (``time.thread_time_ns`` over blocks of
   calls), for raw ``dist.all_reduce``, ``devlayer.all_reduce`` with the ledger on and off,
   and a Python float (raw: the number in a tensor, one ``dist.all_reduce``, ``.tolist()``).
   Other processes' load changes wall time far more than CPU time, so this shows what
   devlayer adds itself.
3. **Paired wall time** (``benchmarks.collectives.Bench``: interleaved rounds, the slowest
   rank), ``--runs`` times, the implementation order reversed on every other run: the ledger
   on vs off, and an A/A control (off vs off, the same code twice) that shows how large a
   ratio the machine's noise makes by itself; and devlayer vs raw. Each run gives the median
   of the per-round ratios; the table gives the median and [min, max] over the runs.
4. **Paired call by call**: the ledger on, off, off again (the A/A control), off plus a CPU
   spin of ``--spin-ns`` where ``begin`` runs (a calibration: what that much CPU work costs
   in wall time on this machine), the ledger's begin before the cost work, and its two
   parts alone (the call-site search; the record), each with the ledger's ``done``, take turns
   call by call on both ranks (each turn in a new order), each call timed with
   ``perf_counter_ns``; per chunk of calls, each arm's median call (the larger of the 2
   ranks), and the ratio; the table gives the median of the chunks' ratios with a
   distribution-free 95 % confidence interval. Pairing by call rather than by block leaves
   the least room for load that comes and goes.

5. **DDP steps with the recording comm hook** (``--skip 5`` leaves it out): a small MLP
   in DDP with devlayer's recording hook (:func:`devlayer.train.commhooks.record_ddp`,
   which puts every gradient bucket's all_reduce in the ledger), without it (torch's own
   DDP), with torch's own Python ``allreduce_hook`` instead (what any Python comm hook
   costs over DDP's C++ path), and without it again (the A/A control) take turns step by
   step as in 4 (forward, backward, SGD step); per chunk each arm's median step (the
   larger of the 2 ranks), the ratio to "none", and steps/s.

This is a benchmark that prints tables, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from time import monotonic, perf_counter_ns
from typing import Any, ClassVar

import torch
import torch.distributed as dist

import devlayer
from devlayer import comm, ledger

if __package__ in (None, ""):  # run as a file (torchrun benchmarks/ledger.py)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.collectives import (
    Bench,
    Impl,
    fmt_bytes,
    ledger_all_reduce,
    median_ci,
    overhead_ci,
    paired,
    pct,
    raw_numbers,
)
from benchmarks.common import git_state, med_range, table

#: Frames from files under this folder are devlayer's (as the ledger decides).
PACKAGE = os.path.dirname(os.path.abspath(ledger.__file__)) + os.sep

_SAMPLES: list[int] = []


def _loadavg() -> str:
    try:
        with open("/proc/loadavg", encoding="utf-8") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


class _TimedEmpty(ledger.Ledger):
    """A ``begin`` that records nothing: the timer's own cost."""

    _REC: ClassVar[list[Any]] = [0, "", None, None, 0, 0.0, 0.0, ledger.DONE]

    def begin(self, op: str, detail: object = None, depth: int = 1) -> list[Any]:
        t0 = perf_counter_ns()
        rec = self._REC
        _SAMPLES.append(perf_counter_ns() - t0)
        return rec


class _TimedCurrent(ledger.Ledger):
    """The ledger's ``begin`` as it is (one frame more: the search starts one higher)."""

    def begin(self, op: str, detail: object = None, depth: int = 1) -> list[Any]:
        t0 = perf_counter_ns()
        rec = ledger.Ledger.begin(self, op, detail, depth + 1)
        _SAMPLES.append(perf_counter_ns() - t0)
        return rec


class _TimedBefore(ledger.Ledger):
    """``begin`` before the cost work: a frame object for every frame from the caller up to
    the user's, and ``f_lineno`` (its records are for timing only: the line is in AT)."""

    def begin(self, op: str, detail: object = None, depth: int = 1) -> list[Any]:
        t0 = perf_counter_ns()
        frame = sys._getframe(1)
        while frame.f_code.co_filename.startswith(PACKAGE) and frame.f_back is not None:
            frame = frame.f_back
        seq = self.n
        self.n = seq + 1
        rec = [seq, op, detail, frame.f_code, frame.f_lineno, monotonic(), 0.0, ledger.RUNNING]
        self.records.append(rec)
        _SAMPLES.append(perf_counter_ns() - t0)
        return rec


class _TimedSiteOnly(_TimedEmpty):
    """Only the current call-site search (depth hint, ``f_lasti``), no record."""

    def begin(self, op: str, detail: object = None, depth: int = 1) -> list[Any]:
        t0 = perf_counter_ns()
        frame = sys._getframe(depth + 1)
        while frame.f_code.co_filename.startswith(PACKAGE) and frame.f_back is not None:
            frame = frame.f_back
        site = (frame.f_code, frame.f_lasti)
        _SAMPLES.append(perf_counter_ns() - t0)
        return [0, op, detail, *site, 0.0, 0.0, ledger.RUNNING]


class _TimedRecordOnly(_TimedEmpty):
    """Only the record: sequence number, a list, a clock read, the ring's append."""

    def begin(self, op: str, detail: object = None, depth: int = 1) -> list[Any]:
        t0 = perf_counter_ns()
        seq = self.n
        self.n = seq + 1
        rec = [seq, op, detail, None, 0, monotonic(), 0.0, ledger.RUNNING]
        self.records.append(rec)
        _SAMPLES.append(perf_counter_ns() - t0)
        return rec


VARIANTS: dict[str, type[ledger.Ledger]] = {
    "empty (the timer)": _TimedEmpty,
    "before: every frame up, f_lineno": _TimedBefore,
    "now: depth hint, f_lasti": _TimedCurrent,
    "now, its call-site search only": _TimedSiteOnly,
    "now, its record only (list, clock, ring)": _TimedRecordOnly,
}


def _in_situ_ns(variant: type[ledger.Ledger], t: torch.Tensor, calls: int) -> float:
    """Median ns of ``begin`` inside ``calls`` real ``devlayer.all_reduce(t)`` calls."""
    ctx = comm._ctx()
    real = ctx.ledger
    object.__setattr__(ctx, "ledger", variant())
    _SAMPLES.clear()
    try:
        for _ in range(calls):
            devlayer.all_reduce(t)
    finally:
        object.__setattr__(ctx, "ledger", real)
    return statistics.median(_SAMPLES)


def _hot_ns(variant: type[ledger.Ledger], t: torch.Tensor, calls: int) -> float:
    """Median ns of ``begin`` called in a loop from here (outside devlayer), nothing between."""
    led = variant()
    _SAMPLES.clear()
    for _ in range(calls):
        ledger.Ledger.done(led.begin("all_reduce", (t.shape, t.dtype)))
    return statistics.median(_SAMPLES)


def in_situ_table(blocks: int, calls: int) -> str:
    """Measurement 1 (see the module docstring)."""
    t = torch.zeros(1)
    situ: dict[str, list[float]] = {name: [] for name in VARIANTS}
    hot: dict[str, list[float]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    for block in range(blocks):
        for name in names if block % 2 == 0 else names[::-1]:
            situ[name].append(_in_situ_ns(VARIANTS[name], t, calls))
            hot[name].append(_hot_ns(VARIANTS[name], t, calls))
    timer_situ = statistics.median(situ[names[0]])
    timer_hot = statistics.median(hot[names[0]])
    rows = [
        [
            name,
            med_range(situ[name], "{:.0f}"),
            f"{statistics.median(situ[name]) - timer_situ:.0f}",
            med_range(hot[name], "{:.0f}"),
            f"{statistics.median(hot[name]) - timer_hot:.0f}",
        ]
        for name in names
    ]
    head = [
        "ledger begin",
        "in situ ns: median [min, max] of blocks",
        "in situ minus timer",
        "hot loop ns",
        "hot loop minus timer",
    ]
    note = (
        f"{blocks} blocks of {calls} calls, rank {dist.get_rank()}; in situ: inside "
        "devlayer.all_reduce of a 4 B tensor (2 devlayer frames below the user's); hot loop: "
        "begin + done called directly, as 'timed alone' did."
    )
    return f"### 1. The ledger's begin, in situ and alone\n\n{note}\n\n" + table(head, rows)


def _cpu_block_ns(fn: Callable[[], object], calls: int) -> float:
    dist.barrier()
    start = time.thread_time_ns()
    for _ in range(calls):
        fn()
    return (time.thread_time_ns() - start) / calls


def cpu_table(sizes: list[int], blocks: int, calls: int) -> str:
    """Measurement 2 (see the module docstring)."""
    rows = []
    for label, impls in _cpu_cases(sizes):
        us: dict[str, list[float]] = {name: [] for name, _ in impls}
        for block in range(blocks):
            for name, fn in impls if block % 2 == 0 else impls[::-1]:
                us[name].append(_cpu_block_ns(fn, calls) / 1000)
        worst = _max_over_ranks([statistics.median(v) for v in us.values()])
        rows.append([label, *(f"{w:.2f}" for w in worst)])
    head = [
        "case",
        "raw µs CPU/call",
        "devlayer (ledger on)",
        "devlayer, ledger off",
    ]
    note = (
        f"CPU time of the calling thread per call (time.thread_time_ns), median of {blocks} "
        f"blocks of {calls} calls, the larger of the 2 ranks."
    )
    return f"### 2. CPU time per call\n\n{note}\n\n" + table(head, rows)


def _cpu_cases(sizes: list[int]) -> list[tuple[str, list[Impl]]]:
    device = devlayer.device()
    cases: list[tuple[str, list[Impl]]] = []
    for nbytes in sizes:
        t = torch.zeros(nbytes // 4, dtype=torch.float32, device=device)
        cases.append(
            (
                f"tensor {fmt_bytes(nbytes)}",
                [
                    ("raw", partial(dist.all_reduce, t)),
                    ("on", partial(ledger_all_reduce, True, t)),
                    ("off", partial(ledger_all_reduce, False, t)),
                ],
            )
        )
    cases.append(
        (
            "a Python float (1.5)",
            [
                ("raw", partial(raw_numbers, device, 1.5)),
                ("on", partial(ledger_all_reduce, True, 1.5)),  # type: ignore[arg-type]
                ("off", partial(ledger_all_reduce, False, 1.5)),  # type: ignore[arg-type]
            ],
        )
    )
    return cases


def _max_over_ranks(values: list[float]) -> list[float]:
    buf = torch.tensor(values, dtype=torch.float64, device=devlayer.device())
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return buf.tolist()


def paired_table(b: Bench, sizes: list[int], runs: int, floats: bool = True) -> str:
    """Measurement 3 (see the module docstring)."""
    rows = []
    for label, value in _cases(sizes, floats):
        ratios: dict[str, list[float]] = {"on/off": [], "A/A": [], "devlayer/raw": []}
        raw_us: list[float] = []
        for run in range(runs):
            impls = _paired_impls(value)
            tm = b.run("ledger", {"case": label, "run": run}, impls[:: 1 if run % 2 == 0 else -1])
            r = tm.rounds
            ratios["on/off"].append(median_ci(paired(r["ledger_on"], r["ledger_off"]))[0])
            ratios["A/A"].append(median_ci(paired(r["ledger_off_again"], r["ledger_off"]))[0])
            ratios["devlayer/raw"].append(median_ci(paired(r["ledger_on"], r["raw"]))[0])
            raw_us.append(statistics.median(tm.repeats["raw"]))
        rows.append([label, med_range(raw_us), *(_spread(ratios[k]) for k in ratios)])
    head = [
        "case",
        "raw µs/call: median [min, max] of runs",
        "ledger on vs off: median [min, max] of the runs' medians",
        "A/A control: off vs off",
        "devlayer (ledger on) vs raw (the whole call)",
    ]
    note = (
        f"{runs} runs of {b.repeats} repeats x {b.rounds} interleaved rounds (blocks of "
        f"~{b.block_s * 1000:g} ms), the order reversed on every other run."
    )
    return f"### 3. Paired wall time\n\n{note}\n\n" + table(head, rows)


#: Measurement 4's arms beside "ledger_off" (``--arms`` picks some).
PER_CALL_ARMS = ("ledger_on", "ledger_off_again", "spin", "before", "site_only", "record_only")


def _cases(sizes: list[int], floats: bool) -> list[tuple[str, int | None]]:
    """The cases of measurements 3 and 4: each size, then the Python float (None)."""
    cases: list[tuple[str, int | None]] = [(fmt_bytes(n), n) for n in sizes]
    return [*cases, ("a Python float (1.5)", None)] if floats else cases


def per_call_table(
    sizes: list[int],
    chunks: int,
    calls: int,
    spin_ns: int,
    arms_kept: str = "",
    floats: bool = True,
) -> str:
    """Measurement 4 (see the module docstring). ``arms_kept``: the arms beside "off" to
    run (comma-separated names of :data:`PER_CALL_ARMS`; all when empty): fewer arms give
    more chunks in the same time, for a narrower interval."""
    keep = {a.strip() for a in arms_kept.split(",") if a.strip()} or set(PER_CALL_ARMS)
    unknown = keep - set(PER_CALL_ARMS)
    if unknown:
        raise SystemExit(f"--arms: unknown {sorted(unknown)}; choose from {list(PER_CALL_ARMS)}")
    rows = []
    for label, value in _cases(sizes, floats):
        impls = _paired_impls(value)
        x = _argument(value)
        every: list[Impl] = [
            *impls[1:],  # on, off, off again
            ("spin", partial(_with_ledger, _Spin(spin_ns), x)),
            ("before", partial(_with_ledger, _Before(), x)),
            ("site_only", partial(_with_ledger, _SiteOnly(), x)),
            ("record_only", partial(_with_ledger, _RecordOnly(), x)),
        ]
        arms = [a for a in every if a[0] == "ledger_off" or a[0] in keep]
        ratios: dict[str, list[float]] = {name: [] for name, _ in arms if name != "ledger_off"}
        medians: list[float] = []
        for _ in range(chunks):
            meds = _per_call_chunk(arms, calls)
            for name in ratios:
                ratios[name].append(meds[name] / meds["ledger_off"])
            medians.append(meds["ledger_off"] / 1000)
        rows.append([label, med_range(medians), *(overhead_ci(v) for v in ratios.values())])
        if dist.get_rank() == 0:  # a row as soon as it is measured: a long run can be cut
            print(f"measurement 4, {label}: {rows[-1]}", file=sys.stderr, flush=True)
    titles = {
        "ledger_on": "ledger on vs off: median (95 % CI) of chunks",
        "ledger_off_again": "A/A control: off vs off",
        "spin": f"off plus {spin_ns} ns of CPU spin where begin is (calibration) vs off",
        "before": "the ledger before the cost work vs off",
        "site_only": "its call-site search only vs off",
        "record_only": "its record only vs off",
    }
    head = [
        "case",
        "ledger off µs/call: median [min, max] of chunks",
        *(titles[name] for name, _ in arms if name != "ledger_off"),
    ]
    note = (
        f"{chunks} chunks of {calls} calls per arm; the arms take turns call by call ("
        f"{', '.join(name for name, _ in arms)}; each turn in a new random order), so "
        "a burst of load falls on all of them alike; per chunk each arm's median call (the "
        "larger of the 2 ranks), then the ratio to 'off'."
    )
    return f"### 4. Paired call by call\n\n{note}\n\n" + table(head, rows)


def _per_call_chunk(arms: list[Impl], calls: int) -> dict[str, float]:
    """Each arm's median ns per call over one chunk (the larger of the ranks)."""
    ns: dict[str, list[int]] = {name: [] for name, _ in arms}
    order = list(arms)
    shuffle = random.Random(calls).shuffle  # the same seed, so the same order, on every rank
    dist.barrier()
    for _ in range(calls):
        shuffle(order)  # each turn runs every arm once, in a new order: no fixed neighbours
        for name, fn in order:
            t0 = perf_counter_ns()
            fn()
            ns[name].append(perf_counter_ns() - t0)
    worst = _max_over_ranks([statistics.median(v) for v in ns.values()])
    return dict(zip(ns, worst, strict=True))


class _Before(ledger.Ledger):
    """``begin`` before the cost work (as ``_TimedBefore``, untimed)."""

    def begin(self, op: str, detail: object = None, depth: int = 1) -> list[Any]:
        frame = sys._getframe(1)
        while frame.f_code.co_filename.startswith(PACKAGE) and frame.f_back is not None:
            frame = frame.f_back
        seq = self.n
        self.n = seq + 1
        rec = [seq, op, detail, frame.f_code, frame.f_lineno, monotonic(), 0.0, ledger.RUNNING]
        self.records.append(rec)
        return rec


class _Spin(ledger.Ledger):
    """No record; ``begin`` spins the CPU for ``ns`` nanoseconds instead (the calibration
    arm: what that much CPU work before the collective costs in wall time here)."""

    _REC: ClassVar[list[Any]] = [0, "", None, None, 0, 0.0, 0.0, ledger.DONE]

    def __init__(self, ns: int) -> None:
        super().__init__(size=1)
        self.ns = ns

    def begin(self, op: str, detail: object = None, depth: int = 1) -> list[Any]:
        end = perf_counter_ns() + self.ns
        while perf_counter_ns() < end:
            pass
        return self._REC


class _SiteOnly(ledger.Ledger):
    """The current call-site search, and no record (one shared list is returned)."""

    _REC: ClassVar[list[Any]] = [0, "", None, None, 0, 0.0, 0.0, ledger.RUNNING]

    def begin(self, op: str, detail: object = None, depth: int = 1) -> list[Any]:
        frame = sys._getframe(depth)  # no extra frame here: the same depth as the ledger's
        while frame.f_code.co_filename.startswith(PACKAGE) and frame.f_back is not None:
            frame = frame.f_back
        rec = self._REC
        rec[ledger.CODE], rec[ledger.AT] = frame.f_code, frame.f_lasti
        return rec


class _RecordOnly(ledger.Ledger):
    """The current record (sequence number, a list, a clock read, the ring), no call site."""

    def begin(self, op: str, detail: object = None, depth: int = 1) -> list[Any]:
        seq = self.n
        self.n = seq + 1
        rec = [seq, op, detail, None, 0, monotonic(), 0.0, ledger.RUNNING]
        self.records.append(rec)
        return rec


def _with_ledger(led: ledger.Ledger, x: Any) -> object:
    """``devlayer.all_reduce(x)`` with ``led`` as the ledger (as ``ledger_all_reduce`` swaps)."""
    ctx = comm._ctx()
    real = ctx.ledger
    object.__setattr__(ctx, "ledger", led)
    try:
        return devlayer.all_reduce(x)
    finally:
        object.__setattr__(ctx, "ledger", real)


def _argument(value: int | None) -> Any:
    """A zero float32 tensor of ``value`` bytes, or the Python float 1.5 for None."""
    if value is None:
        return 1.5
    return torch.zeros(value // 4, dtype=torch.float32, device=devlayer.device())


def _paired_impls(value: int | None) -> list[Impl]:
    x = _argument(value)
    raw: Callable[[], object] = (
        partial(raw_numbers, devlayer.device(), x) if value is None else partial(dist.all_reduce, x)
    )
    return [
        ("raw", raw),
        ("ledger_on", partial(ledger_all_reduce, True, x)),
        ("ledger_off", partial(ledger_all_reduce, False, x)),
        ("ledger_off_again", partial(ledger_all_reduce, False, x)),
    ]


def _spread(ratios: list[float]) -> str:
    return f"{pct(statistics.median(ratios))} % [{pct(min(ratios))}, {pct(max(ratios))}]"


def _ddp_arm(hook: str) -> Callable[[], object]:
    """One training step of a fresh small DDP model (about 1 MiB of gradients), with
    devlayer's recording comm hook (``"devlayer"``), torch's own Python ``allreduce_hook``
    (``"torch"``: what any Python comm hook costs) or none (``"none"``: DDP's C++ path)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    from devlayer.train.commhooks import record_ddp
    from devlayer.train.strategy import DDP_DEFAULTS

    torch.manual_seed(0)
    layers = [torch.nn.Linear(256, 256) for _ in range(4)]
    ddp = DistributedDataParallel(torch.nn.Sequential(*layers), **DDP_DEFAULTS)
    if hook == "devlayer":
        record_ddp(ddp)
    elif hook == "torch":
        ddp.register_comm_hook(None, allreduce_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-3)
    x = torch.randn(32, 256)

    def step() -> object:
        ddp(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return None

    return step


def ddp_table(chunks: int, steps: int) -> str:
    """Measurement 5 (see the module docstring)."""
    arms: list[Impl] = [
        ("hook", _ddp_arm("devlayer")),
        ("torch_python_hook", _ddp_arm("torch")),
        ("none", _ddp_arm("none")),
        ("none_again", _ddp_arm("none")),
    ]
    for _, fn in arms:
        for _ in range(5):  # DDP rebuilds its buckets after the first step: warm up past it
            fn()
    ratios: dict[str, list[float]] = {"hook": [], "torch_python_hook": [], "none_again": []}
    step_us: dict[str, list[float]] = {name: [] for name, _ in arms}
    for _ in range(chunks):
        meds = _per_call_chunk(arms, steps)
        for name in ratios:
            ratios[name].append(meds[name] / meds["none"])
        for name in step_us:
            step_us[name].append(meds[name] / 1000)
    rows = [
        [
            name,
            med_range(step_us[name]),
            f"{1e6 / statistics.median(step_us[name]):.0f}",
            overhead_ci(ratios[name]) if name in ratios else "-",
        ]
        for name, _ in arms
    ]
    head = [
        "DDP arm",
        "µs/step: median [min, max] of chunks",
        "steps/s (median step)",
        "vs none: median (95 % CI) of chunks",
    ]
    note = (
        f"{chunks} chunks of {steps} steps per arm, taking turns step by step (each turn in "
        "a new random order); a 4 x Linear(256, 256) MLP, batch 32, SGD; 'hook': devlayer's "
        "recording comm hook (one ledger record per bucket), 'torch python hook': torch's own "
        "allreduce_hook (what any Python comm hook costs), 'none': torch's DDP (its C++ "
        "path), 'none again': the same, the A/A control."
    )
    return f"### 5. DDP steps with the recording comm hook\n\n{note}\n\n" + table(head, rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5, help="paired runs (default 5)")
    p.add_argument("--sizes", default="4,1048576", help="tensor sizes in bytes (default 4,1MiB)")
    p.add_argument("--repeats", type=int, default=5, help="repeats per paired run (default 5)")
    p.add_argument("--rounds", type=int, default=6, help="rounds per repeat (default 6)")
    p.add_argument("--block-s", type=float, default=0.03, help="seconds per block (0.03)")
    p.add_argument("--calls", type=int, default=2000, help="calls per in-situ/CPU block")
    p.add_argument("--blocks", type=int, default=6, help="in-situ and CPU blocks (default 6)")
    p.add_argument("--chunks", type=int, default=12, help="call-by-call chunks (default 12)")
    p.add_argument(
        "--spin-ns",
        type=int,
        default=1000,
        help="CPU spin of measurement 4's calibration arm, ns (default 1000: about the "
        "ledger's begin in situ, measurement 1)",
    )
    p.add_argument("--ddp-steps", type=int, default=100, help="DDP steps per arm per chunk (5)")
    p.add_argument(
        "--arms",
        default="",
        help=f"measurement 4's arms beside ledger_off, comma-separated (default all: "
        f"{','.join(PER_CALL_ARMS)})",
    )
    p.add_argument(
        "--float",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure a Python float in measurements 3 and 4 (default on)",
    )
    p.add_argument("--skip", default="", help="comma-separated measurements to skip (1-5), e.g. 3")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = [int(n) for n in args.sizes.split(",") if n.strip()]
    st = devlayer.init()
    try:
        if st.world_size < 2:
            print("start it with: torchrun --standalone --nproc-per-node=2 -m benchmarks.ledger")
            return 2
        load_start = _loadavg()
        t0 = time.perf_counter()
        b = Bench(
            repeats=args.repeats,
            rounds=args.rounds,
            block_s=args.block_s,
            warmup=10,
            max_iters=5000,
        )
        skip = {n.strip() for n in args.skip.split(",")}
        measurements: list[tuple[str, Callable[[], str]]] = [
            ("1", partial(in_situ_table, args.blocks, args.calls)),
            ("2", partial(cpu_table, sizes, args.blocks, args.calls // 4)),
            ("3", partial(paired_table, b, sizes, args.runs, args.float)),
            (
                "4",
                partial(
                    per_call_table,
                    sizes,
                    args.chunks,
                    args.calls // 4,
                    args.spin_ns,
                    args.arms,
                    args.float,
                ),
            ),
            ("5", partial(ddp_table, args.chunks, args.ddp_steps)),
        ]
        parts = [run() for key, run in measurements if key not in skip]
        if st.is_main:
            head = (
                f"## devlayer collective ledger benchmark\n\ngit {git_state()} · torch "
                f"{torch.__version__} · {os.cpu_count()} cores · world {st.world_size} · comm "
                f"{st.comm} · OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} · load "
                f"average {load_start} (start), {_loadavg()} (end) · "
                f"{time.perf_counter() - t0:.0f} s"
            )
            print("\n\n".join([head, *parts]))
        return 0
    finally:
        devlayer.shutdown()


if __name__ == "__main__":
    sys.exit(main())
