"""Run the whole benchmark suite once and keep everything it measured.

    python -m benchmarks.run --quick          # about 2 minutes on 2 CPU cores: a smoke run
    python -m benchmarks.run                  # the figures in docs/performance.md
    python -m benchmarks.run --only training,memory --nproc 4

Steps, each a fresh process (``torchrun --standalone`` for the distributed ones), with
``OMP_NUM_THREADS=1`` unless it is already set, so every rank gets one core:

1. ``startup``: ``benchmarks/startup.py`` (import and ``init()`` cost vs the peers).
2. ``collectives``: ``benchmarks/collectives.py`` at ``--nproc`` ranks (all_reduce /
   all_gather / broadcast vs raw, the 64-metric dict vs raw loops and the peers).
3. ``training``: ``benchmarks/training.py`` for the MLP and the CNN at world size 1 and
   ``--nproc``: devlayer.Trainer vs a hand-written DDP loop vs Accelerate, Fabric, Ignite.
   Scaling efficiency (samples/s at N ranks / (N x samples/s at 1 rank)) comes from these.
4. ``memory``: one ``training.py`` process per implementation (CNN, ``--nproc`` ranks, one
   repeat), so each peak RSS belongs to one implementation.
5. ``fsdp``: ``benchmarks/fsdp.py`` once per strategy (DDP, devlayer's FSDP, Accelerate's
   FSDP) at ``--nproc`` ranks: parameter + gradient + optimizer bytes per rank, peak RSS and
   samples/s for a 50 M-parameter MLP (``--quick``: 4 M).
6. ``checkpoints``: ``benchmarks/async_checkpoint.py --all --writers`` at ``--nproc`` ranks:
   the time the loop is blocked per checkpoint and samples/s while saving, synchronous vs
   ``checkpoint_async=True``, DDP and FSDP, with Accelerate's and Fabric's saves for
   reference, and the thread vs process writer at world 1 (``--quick``: a 1 M-parameter
   model, the devlayer modes only).

Output: ``benchmarks/results/<UTC time>/`` with ``environment.json``, one ``<step>.jsonl``
(raw records) and ``<step>.md`` (the step's printed tables) per step, ``summary.md`` (the
derived tables: targets, scaling efficiency, peak RSS), and with matplotlib installed
(``pip install devlayer[bench]``) ``allreduce.png`` and ``training.png``. The summary is
printed at the end. Nothing here asserts a timing; it reports.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.common import git_state, med_range, table, versions  # noqa: E402
from benchmarks.training import IMPLS, installed  # noqa: E402
from devlayer.devices import usable_cpus  # noqa: E402

STEPS = ("startup", "collectives", "training", "memory", "fsdp", "checkpoints")
MODELS = ("mlp", "cnn")
PEERS = ("accelerate", "lightning", "pytorch-ignite", "matplotlib")
TRAIN_REF = "hand-written DDP loop"
TRAINER = "devlayer.Trainer"
MEMORY_MODEL = "cnn"
#: ``--quick``'s checkpoint modes: devlayer's own (the peers' saves only in a full run).
QUICK_CHECKPOINT_MODES = "none,sync-ddp,async-ddp,sync-fsdp,async-fsdp"


# --------------------------------------------------------------------------- running


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    # A launcher's variables from an outer job would make every child think it is a rank.
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _torchrun(nproc: int, script: str, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(ROOT / "benchmarks" / script),
        *args,
    ]


def checkpoints_command(nproc: int, quick: bool, jsonl: Path) -> list[str]:
    """The ``checkpoints`` step: every save mode at ``nproc`` ranks and the writer kinds.

    ``async_checkpoint.py --all`` starts one ``torchrun`` per mode itself (each peak RSS
    belongs to one mode), so it runs as a plain process here.
    """
    cmd = [sys.executable, str(ROOT / "benchmarks" / "async_checkpoint.py")]
    cmd += ["--all", "--writers", "--nproc", str(nproc), "--json", str(jsonl)]
    if quick:
        cmd += ["--quick", "--modes", QUICK_CHECKPOINT_MODES]
    return cmd


def run_step(out: Path, step: str, cmd: list[str], timeout: float) -> float:
    """Run one command, echo and append its stdout to ``<step>.md``; return seconds taken."""
    shown = " ".join(Path(c).name if c == sys.executable else c for c in cmd)
    print(f"\n$ {shown}", flush=True)
    t0 = time.perf_counter()
    with (out / f"{step}.log").open("a") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=log, text=True
        )
        watchdog = threading.Timer(timeout, proc.kill)  # a hung rank must not hang the suite
        watchdog.start()
        try:
            assert proc.stdout is not None
            with (out / f"{step}.md").open("a") as md:
                md.write(f"\n<!-- $ {shown} -->\n")
                for line in proc.stdout:
                    sys.stdout.write(line)
                    md.write(line)
            rc = proc.wait()
        finally:
            timed_out = not watchdog.is_alive()
            watchdog.cancel()
    if rc != 0:
        why = f"was killed after {timeout:.0f} s" if timed_out else f"exited with {rc}"
        raise SystemExit(f"{step}: `{shown}` {why}; see {out / f'{step}.log'}")
    return time.perf_counter() - t0


def environment() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    except OSError:
        pass
    accel = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": git_state(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "omp_num_threads": _env()["OMP_NUM_THREADS"],
        "accelerator": str(accel) if accel is not None else None,
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "versions": versions(("torch", "devlayer", *PEERS)),
    }


# --------------------------------------------------------------------------- reading results


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_sps(records: list[dict[str, Any]]) -> dict[tuple[str, int, str], list[float]]:
    """(model, world, impl) -> samples/s per repeat."""
    out: dict[tuple[str, int, str], list[float]] = defaultdict(list)
    for r in records:
        if r.get("type") == "result":
            out[(r.get("model", "mlp"), r["world_size"], r["impl"])].append(r["samples_per_s"])
    return out


def scaling_rows(records: list[dict[str, Any]], nproc: int) -> list[list[str]]:
    sps = training_sps(records)
    rows = []
    for model in MODELS:
        for impl in dict.fromkeys(k[2] for k in sps if k[0] == model):
            one, many = sps.get((model, 1, impl)), sps.get((model, nproc, impl))
            if not one or not many:
                continue
            s1, sn = statistics.median(one), statistics.median(many)
            rows.append(
                [
                    model,
                    impl,
                    f"{s1:.0f}",
                    f"{sn:.0f}",
                    f"{sn / s1:.2f}x",
                    f"{sn / (nproc * s1):.0%}",
                ]
            )
    return rows


def memory_rows(records: list[dict[str, Any]]) -> list[list[str]]:
    per_impl = {
        r["impls"][0]: r["peak_rss_mb_per_rank"]
        for r in records
        if r.get("type") == "memory" and len(r.get("impls", ())) == 1
    }
    ref = per_impl.get(TRAIN_REF)
    rows = []
    for impl, ranks in per_impl.items():
        ratio = f"{max(ranks) / max(ref):.3f}x" if ref else "n/a"
        rows.append([impl, ", ".join(f"{v:.0f}" for v in ranks), f"{max(ranks):.0f}", ratio])
    return rows


def training_rows(records: list[dict[str, Any]]) -> list[list[str]]:
    sps = training_sps(records)
    ttfs: dict[tuple[str, int, str], list[float]] = defaultdict(list)
    for r in records:
        if r.get("type") == "result":
            key = (r.get("model", "mlp"), r["world_size"], r["impl"])
            ttfs[key].append(r["time_to_first_step_s"] * 1e3)
    rows = []
    for (model, world, impl), values in sps.items():
        ref = sps.get((model, world, TRAIN_REF))
        ratio = (
            med_range([a / b for a, b in zip(values, ref, strict=False)], "{:.3f}") + "x"
            if ref
            else "n/a"
        )
        rows.append(
            [
                model,
                str(world),
                impl,
                med_range(values, "{:.0f}"),
                ratio,
                med_range(ttfs[(model, world, impl)], "{:.1f}"),
            ]
        )
    return rows


def summary(out: Path, env: dict[str, Any], args: argparse.Namespace, wall: float) -> str:
    train = read_jsonl(out / "training.jsonl")
    memory = read_jsonl(out / "memory.jsonl")
    v = env["versions"]
    parts = [
        f"# Benchmark summary ({'quick' if args.quick else 'full'} run)\n",
        f"`python -m benchmarks.run{' --quick' if args.quick else ''} --nproc {args.nproc}`, "
        f"{env['date_utc']}, git {env['git']}, {env['cpu_model']} ({env['usable_cpus']} usable "
        f"CPUs), OMP_NUM_THREADS={env['omp_num_threads']}, accelerator {env['accelerator']}, "
        f"python {env['python']}, "
        + ", ".join(f"{k} {val}" for k, val in v.items() if val)
        + f"; wall {wall:.0f} s. Raw data: {out.name}/*.jsonl; each step's tables: *.md.",
    ]
    if train:
        parts += [
            "\n## Training throughput (warm samples/s; median [min, max] over repeats)\n",
            table(
                [
                    "model",
                    "world",
                    "implementation",
                    "samples/s",
                    "ratio vs hand-written",
                    "time to first step (ms)",
                ],
                training_rows(train),
            ),
        ]
        rows = scaling_rows(train, args.nproc)
        if rows:
            parts += [
                f"\n## Scaling efficiency, world 1 -> {args.nproc}\n",
                "Samples/s at N ranks / (N x samples/s at 1 rank), from the medians above. "
                "Each rank has one core (OMP_NUM_THREADS=1).\n",
                table(
                    [
                        "model",
                        "implementation",
                        "samples/s, 1 rank",
                        f"samples/s, {args.nproc} ranks",
                        "speed-up",
                        "efficiency",
                    ],
                    rows,
                ),
            ]
    if memory:
        parts += [
            f"\n## Peak RSS per rank ({MEMORY_MODEL}, {args.nproc} ranks, one process per "
            "implementation; MiB; includes the implementation's imports)\n",
            table(
                ["implementation", "per rank", "max", "vs hand-written (target <= 1.05x)"],
                memory_rows(memory),
            ),
        ]
    fsdp = read_jsonl(out / "fsdp.jsonl")
    if fsdp:
        parts += [
            f"\n## DDP vs FSDP per rank ({args.nproc} ranks; MiB; parameters + gradients + "
            "AdamW state held by the rank; target: FSDP <= 0.6x DDP)\n",
            table(
                [
                    "strategy",
                    "sharded",
                    "params",
                    "grads",
                    "optimizer",
                    "total",
                    "vs DDP",
                    "peak RSS",
                    "samples/s",
                ],
                fsdp_rows(fsdp),
            ),
        ]
    return "\n".join(parts + checkpoint_section(read_jsonl(out / "checkpoints.jsonl"))) + "\n"


def checkpoint_section(records: list[dict[str, Any]]) -> list[str]:
    """The summary's checkpoint tables (none when the step did not run)."""
    from benchmarks.async_checkpoint import table_rows

    runs = [r for r in records if "mode" in r]
    writers = [r for r in records if r.get("type") == "writer"]
    parts: list[str] = []
    if runs:
        ranks = len({r["rank"] for r in runs})
        model = next((r["params_m"] for r in runs if "params_m" in r), "?")
        parts += [
            f"\n## Checkpoint stalls ({model} M parameters, {ranks} ranks; rank 0's figures; "
            "target: async blocked <= 0.10x sync)\n",
            table(
                ["mode", "blocked s/ckpt", "vs sync", "samples/s", "vs no saves", "ckpt MB"],
                [row[:6] for row in table_rows(runs)],
            ),
        ]
    if writers:
        cells = [
            [w["writer"], f"{w['samples_per_s']:.1f}", f"{w['ratio']:.2f}x", str(w["writes"])]
            for w in writers
        ]
        parts += [
            "\n## Background writer: thread vs process (world 1, samples/s while writing)\n",
            table(
                ["writer", "samples/s", "vs no writer", "writes"],
                cells,
            ),
        ]
    return parts


def fsdp_rows(records: list[dict[str, Any]]) -> list[list[str]]:
    """One row per strategy: the largest rank's figures (ranks differ by a padding row)."""
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r.get("type") == "fsdp":
            by[r["strategy"]].append(r)
    ddp = max((r.get("total_mb", 0.0) for r in by.get("ddp", [])), default=0.0)
    rows = []
    for strategy, ranks in by.items():
        if any("skipped" in r for r in ranks):
            reason = next(r["skipped"] for r in ranks if "skipped" in r)
            rows.append([strategy, f"skipped: {reason[:120]}", *[""] * 7])
            continue
        top = max(ranks, key=lambda r: r["total_mb"])
        ratio = f"{top['total_mb'] / ddp:.2f}x" if ddp else "n/a"
        sizes = [f"{top[k]:.0f}" for k in ("params_mb", "grads_mb", "optim_mb", "total_mb")]
        rss = f"{max(r['peak_rss_mb'] for r in ranks):.0f}"
        sharded = "yes" if top.get("sharded") else "no"
        rows.append([strategy, sharded, *sizes, ratio, rss, f"{top['samples_per_s']:.1f}"])
    return rows


# --------------------------------------------------------------------------- plots


def plots(out: Path) -> list[Path]:
    """PNG plots with matplotlib (optional); returns the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, MaxNLocator
    except ImportError:
        print("matplotlib is not installed (pip install devlayer[bench]): no plots")
        return []
    made = []
    coll = [
        r
        for r in read_jsonl(out / "collectives.jsonl")
        if r.get("type") == "result" and r.get("section") == "all_reduce"
    ]
    if coll:
        fig, ax = plt.subplots(figsize=(6, 4))
        by: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in coll:
            by[r["impl"]][r["bytes"]].append(r["us_per_call"])
        for impl, points in by.items():
            xs = sorted(points)
            ax.plot(xs, [statistics.median(points[x]) for x in xs], marker="o", label=impl)
        ax.set(xscale="log", yscale="log", xlabel="message size (bytes)", ylabel="µs per call")
        ax.set_title("all_reduce, median over repeats")
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "allreduce.png", dpi=110)
        plt.close(fig)
        made.append(out / "allreduce.png")
    sps = training_sps(read_jsonl(out / "training.jsonl"))
    if sps:
        groups = sorted({(m, w) for m, w, _ in sps}, key=lambda g: (MODELS.index(g[0]), g[1]))
        impls = list(dict.fromkeys(i for _, _, i in sps))
        fig, axes = plt.subplots(
            1, len(groups), figsize=(2.6 * len(groups) + 1.6, 3), squeeze=False, sharey=True
        )
        ys = range(len(impls))
        for ax, (model, world) in zip(axes[0], groups, strict=True):
            runs = [sps.get((model, world, i), [0.0]) for i in impls]
            mid = [statistics.median(r) for r in runs]
            err = [[m - min(r) for m, r in zip(mid, runs, strict=True)]]
            err.append([max(r) - m for m, r in zip(mid, runs, strict=True)])
            ax.barh(ys, mid, xerr=err, color=[f"C{k}" for k in ys], capsize=2)
            ax.set_title(f"{model}, world {world}", fontsize=9)
            ax.set_xlabel("warm samples/s", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.xaxis.set_major_locator(MaxNLocator(4))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k"))
        axes[0][0].set_yticks(list(ys), impls)
        axes[0][0].invert_yaxis()
        fig.suptitle("training throughput: median, bars span min-max over repeats", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "training.png", dpi=110)
        plt.close(fig)
        made.append(out / "training.png")
    return made


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument(
        "--quick", action="store_true", help="short smoke run (about 2 minutes on 2 cores)"
    )
    p.add_argument("--nproc", type=int, default=2, help="ranks for the distributed steps")
    p.add_argument("--only", default=",".join(STEPS), help="comma-separated: " + ",".join(STEPS))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="parent folder")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per step")
    args = p.parse_args(argv)
    steps = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in steps if s not in STEPS]
    if bad:
        p.error(f"--only: unknown step(s) {bad}; choose from {list(STEPS)}")
    if args.nproc < 2:
        p.error(f"--nproc {args.nproc}: the distributed steps need at least 2 ranks")

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) / stamp
    out.mkdir(parents=True)
    env = environment()
    (out / "environment.json").write_text(json.dumps({**env, "args": vars(args)}, indent=2))
    print(f"writing {out}")
    quick = ["--quick"] if args.quick else []
    t0 = time.perf_counter()
    if "startup" in steps:
        cmd = [sys.executable, str(ROOT / "benchmarks" / "startup.py")]
        cmd += ["--repeats", "2" if args.quick else "7", "--json", str(out / "startup.jsonl")]
        run_step(out, "startup", cmd, args.timeout)
    if "collectives" in steps:
        cmd = _torchrun(args.nproc, "collectives.py", *quick)
        run_step(out, "collectives", [*cmd, "--json", str(out / "collectives.jsonl")], args.timeout)
    if "training" in steps:
        for model in MODELS:
            for world in (1, args.nproc):
                cmd = _torchrun(world, "training.py", "--model", model, *quick)
                cmd += ["--json", str(out / "training.jsonl")]
                run_step(out, "training", cmd, args.timeout)
    if "memory" in steps:
        for impl, (_, module) in IMPLS.items():
            if not installed(module):
                continue
            cmd = _torchrun(args.nproc, "training.py", "--model", MEMORY_MODEL, "--quick")
            cmd += ["--impls", impl, "--repeats", "1", "--json", str(out / "memory.jsonl")]
            run_step(out, "memory", cmd, args.timeout)
    if "fsdp" in steps:
        for strategy in ("ddp", "fsdp", "accelerate-fsdp"):
            cmd = _torchrun(args.nproc, "fsdp.py", "--strategy", strategy, *quick)
            run_step(out, "fsdp", [*cmd, "--json", str(out / "fsdp.jsonl")], args.timeout)
    if "checkpoints" in steps:
        cmd = checkpoints_command(args.nproc, args.quick, out / "checkpoints.jsonl")
        run_step(out, "checkpoints", cmd, args.timeout)
    wall = time.perf_counter() - t0
    text = summary(out, env, args, wall)
    if not args.no_plots:
        made = plots(out)
        if made:
            text += "\nPlots: " + ", ".join(m.name for m in made) + "\n"
    (out / "summary.md").write_text(text)
    print("\n" + text)
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
