"""Checkpoint stalls: synchronous vs ``checkpoint_async=True``, DDP and FSDP (issue 24).

    torchrun --standalone --nproc-per-node=2 benchmarks/async_checkpoint.py --mode async
    python -m benchmarks.async_checkpoint --all           # every mode, one table, ratios
    python -m benchmarks.async_checkpoint --all --quick   # a 4 x 512 model, for the tests
    python -m benchmarks.async_checkpoint --writers       # thread vs process writer, world 1

One mode per torchrun job, so each peak RSS belongs to one mode. The model is an MLP of
``--layers`` square ``Linear(--width)`` layers (12 x 2048 = 50 M parameters) trained with
AdamW by the devlayer ``Trainer``, saving every ``--every`` steps. Modes:

* ``none``: no checkpoints (the reference for samples/s);
* ``sync-ddp`` / ``async-ddp`` / ``sync-fsdp`` / ``async-fsdp``: the Trainer's saves;
* ``accelerate``: a hand loop with Accelerate's ``save_state`` every ``--every`` steps;
* ``fabric``: a hand loop with Lightning Fabric's ``save`` (when lightning is installed).

Each rank reports the time the training loop was blocked per periodic checkpoint (the
Trainer's save call, including any wait for the save in flight), samples/s over the steps
after the first, the checkpoint's size on disk and its peak RSS. ``--writers`` measures,
in one process, how much a background writer slows a training loop when it is a thread
and when it is a separate process (the choice in docs/checkpoints.md).

Prints ``RESULT {json}`` lines and, with ``--all``, a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

MODES = ("none", "sync-ddp", "async-ddp", "sync-fsdp", "async-fsdp", "accelerate", "fabric")


def make_model(width: int, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    blocks: list[torch.nn.Module] = []
    for _ in range(layers):
        blocks += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*blocks)


def _data(width: int, n: int) -> Any:
    g = torch.Generator().manual_seed(1)
    return torch.utils.data.TensorDataset(
        torch.randn(n, width, generator=g), torch.randn(n, width, generator=g)
    )


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def trainer_mode(mode: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """The devlayer Trainer with sync or async saves (or none)."""
    import devlayer
    from devlayer.train.checkpointing import Checkpointer

    blocked: list[float] = []
    real_save = Checkpointer.save

    def timed_save(self: Any, *a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return real_save(self, *a, **kw)
        finally:
            if kw.get("step", 0) < args.steps:  # periodic saves only, not the run's last
                blocked.append(time.perf_counter() - t)

    Checkpointer.save = timed_save  # type: ignore[method-assign]
    marks: list[float] = []

    class Clock(devlayer.train.Callback):
        def on_train_batch_end(self, trainer: Any, loss: Any) -> None:
            marks.append(time.perf_counter())

    model = make_model(args.width, args.layers)
    saving = mode != "none"
    trainer = devlayer.Trainer(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-4),
        torch.nn.functional.mse_loss,
        batch_size=args.batch * devlayer.world_size(),
        max_steps=args.steps,
        checkpoint_dir=folder if saving else None,
        checkpoint_every=args.every if saving else None,
        checkpoint_async=mode.startswith("async"),
        strategy="fsdp" if mode.endswith("fsdp") else "ddp",
        progress=False,
        num_workers=0,
        resume=None,
        callbacks=[Clock()],
    )
    trainer.fit(_data(args.width, args.batch * devlayer.world_size() * args.steps))
    steps = len(marks) - 1
    return {
        "blocked_s": blocked,
        "samples_per_s": args.batch * devlayer.world_size() * steps / (marks[-1] - marks[0]),
    }


def hand_loop(mode: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Accelerate's ``save_state`` or Fabric's ``save`` in a plain loop, every --every steps."""
    model = make_model(args.width, args.layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if mode == "accelerate":
        from accelerate import Accelerator

        acc = Accelerator(cpu=True)
        model, opt = acc.prepare(model, opt)
        backward, save = acc.backward, lambda step: acc.save_state(str(folder / f"s{step}"))
    else:
        from lightning.fabric import Fabric

        fabric = Fabric(accelerator="cpu", strategy="ddp", devices=int(os.environ["WORLD_SIZE"]))
        fabric.launch()
        model, opt = fabric.setup(model, opt)
        state = {"model": model, "optimizer": opt}
        backward, save = fabric.backward, lambda step: fabric.save(folder / f"s{step}.ckpt", state)
    x, y = (t[: args.batch] for t in _data(args.width, args.batch).tensors)
    blocked, marks = [], []
    for step in range(1, args.steps + 1):
        backward(torch.nn.functional.mse_loss(model(x), y))
        opt.step()
        opt.zero_grad()
        if step % args.every == 0 and step < args.steps:
            t = time.perf_counter()
            save(step)
            blocked.append(time.perf_counter() - t)
        marks.append(time.perf_counter())
    world = torch.distributed.get_world_size()
    return {
        "blocked_s": blocked,
        "samples_per_s": args.batch * world * (len(marks) - 1) / (marks[-1] - marks[0]),
    }


def run_mode(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(args.dir) / mode
    if mode in ("accelerate", "fabric"):
        rank = int(os.environ.get("RANK", "0"))
        result = hand_loop(mode, args, folder)
    else:
        import devlayer

        with devlayer.init():
            rank = devlayer.rank()
            result = trainer_mode(mode, args, folder)
    blocked = sorted(result.pop("blocked_s"))
    return {
        "mode": mode,
        "rank": rank,
        "params_m": round(
            sum(p.numel() for p in make_model(args.width, args.layers).parameters()) / 1e6, 1
        ),
        "saves": len(blocked),
        "blocked_s_median": blocked[len(blocked) // 2] if blocked else None,
        "samples_per_s": round(result["samples_per_s"], 2),
        "checkpoint_mb": round(_size(folder) / 2**20, 1) if folder.exists() else 0.0,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


# ------------------------------------------------------------------ thread vs process


def _write_copy(state: dict[str, torch.Tensor], path: str) -> None:
    """What the background writer does: torch.save with a sha256 on the way, then fsync."""
    from devlayer.train.files import HashingWriter

    with open(path, "wb") as f:
        torch.save(state, HashingWriter(f))  # type: ignore[arg-type]
        f.flush()
        os.fsync(f.fileno())


def _loop_rate(model: torch.nn.Module, x: torch.Tensor, seconds: float) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.nn.functional.mse_loss(model(x), x).backward()
        opt.step()
        opt.zero_grad()
        n += 1
    return n * x.shape[0] / (time.perf_counter() - t0)


def writers(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Training samples/s while a staged copy is written by a thread, by a process, or not."""
    import multiprocessing as mp
    import threading

    torch.set_num_threads(1)  # the training loop on one core, the writer on the other
    model = make_model(args.width, args.layers)
    x = torch.randn(args.batch, args.width)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out: list[dict[str, Any]] = []
    for how in ("none", "thread", "process"):
        path = str(Path(args.dir) / f"w-{how}.pt")
        writes, stop = [0], threading.Event()

        def keep_writing(
            how: str = how,
            path: str = path,
            stop: threading.Event = stop,
            writes: list[int] = writes,
        ) -> None:
            while not stop.is_set():
                if how == "thread":
                    _write_copy(state, path)
                else:
                    p = mp.get_context("fork").Process(target=_write_copy, args=(state, path))
                    p.start()
                    p.join()
                    if p.exitcode != 0:
                        raise RuntimeError(f"the writer process exited with {p.exitcode}")
                writes[0] += 1

        driver = threading.Thread(target=keep_writing, daemon=True) if how != "none" else None
        if driver is not None:
            driver.start()
        rate = _loop_rate(model, x, args.seconds)
        stop.set()
        if driver is not None:
            driver.join()
        out.append({"writer": how, "samples_per_s": round(rate, 2), "writes": writes[0]})
    base = out[0]["samples_per_s"]
    for r in out:
        r["ratio"] = round(r["samples_per_s"] / base, 3)
    return out


# ------------------------------------------------------------------ driver


def _torchrun(mode: str, args: argparse.Namespace, nproc: int) -> list[dict[str, Any]]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        __file__, "--mode", mode, "--dir", args.dir, "--width", str(args.width),
        "--layers", str(args.layers), "--batch", str(args.batch), "--steps", str(args.steps),
        "--every", str(args.every),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=args.timeout, check=False
    )
    records = [
        json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")
    ]
    if proc.returncode != 0 or not records:
        return [{"mode": mode, "rank": 0, "skipped": skip_reason(proc.stderr or proc.stdout)}]
    return records


def skip_reason(text: str) -> str:
    """One line for a failed mode: the last ``...Error: ...`` line of its output (a rank's
    exception, not torchrun's footer), else the last non-empty line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"[\w.]+(Error|Exception): ", ln)]
    return (errors or lines or ["failed"])[-1][:200]


def table_rows(records: list[dict[str, Any]]) -> list[list[str]]:
    """One row per mode (rank 0's figures), with ratios against sync and against no saves."""
    by = {r["mode"]: r for r in records if r.get("rank") == 0}
    none = by.get("none", {}).get("samples_per_s")
    rows = []
    for mode, r in by.items():
        if "skipped" in r:
            rows.append([mode, "skipped", skip_reason(r["skipped"])[:80], "", "", "", ""])
            continue
        kind = mode.split("-")[-1]
        sync = by.get(f"sync-{kind}", {}).get("blocked_s_median")
        blocked = r["blocked_s_median"]
        ratio = f"{blocked / sync:.2f}x" if blocked is not None and sync else ""
        speed = f"{r['samples_per_s'] / none:.2f}x" if none else ""
        shown = f"{blocked:.3f}" if blocked is not None else "-"
        rows.append(
            [
                mode,
                shown,
                ratio,
                f"{r['samples_per_s']:.1f}",
                speed,
                f"{r['checkpoint_mb']:.0f}",
                f"{r['peak_rss_mb']:.0f}",
            ]
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=MODES, default=None)
    p.add_argument("--all", action="store_true", help="every mode at world 2, then a table")
    p.add_argument("--writers", action="store_true", help="thread vs process writer, world 1")
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--batch", type=int, default=8, help="samples per rank and step")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--every", type=int, default=6)
    p.add_argument("--seconds", type=float, default=20.0, help="--writers: per writer kind")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--modes", default=",".join(MODES), help="--all: these modes (comma list)")
    p.add_argument("--quick", action="store_true", help="a 4 x 512 model, 6 steps")
    p.add_argument("--dir", default=None, help="checkpoint folder (default: a temp folder)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--json", default=None, help="append the records to this JSONL file")
    args = p.parse_args()
    if args.quick:
        args.width, args.layers, args.steps, args.every, args.seconds = 512, 4, 6, 2, 2.0
    temp = args.dir is None
    args.dir = args.dir or tempfile.mkdtemp(prefix="devlayer-async-bench-")
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    try:
        records = _records(args)
    finally:
        if temp:
            shutil.rmtree(args.dir, ignore_errors=True)
    if args.json:
        with open(args.json, "a", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)


def _records(args: argparse.Namespace) -> list[dict[str, Any]]:
    from benchmarks.common import table

    if args.mode is not None:
        record = run_mode(args.mode, args)
        os.write(1, ("RESULT " + json.dumps(record) + "\n").encode())
        return [record]
    records: list[dict[str, Any]] = []
    if args.writers:
        records += [{"type": "writer", **r} for r in writers(args)]
        print(
            table(
                ["writer", "samples/s", "vs no writer", "writes"],
                [
                    [r["writer"], str(r["samples_per_s"]), f"{r['ratio']:.2f}x", str(r["writes"])]
                    for r in records
                ],
            )
        )
    if args.all:
        modes = [m for m in args.modes.split(",") if m]
        unknown = sorted(set(modes) - set(MODES))
        if unknown:
            raise SystemExit(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")
        runs = [r for mode in modes for r in _torchrun(mode, args, args.nproc)]
        records += runs
        print(
            f"model {runs[0].get('params_m', '?')} M parameters, world {args.nproc}, "
            f"save every {args.every} of {args.steps} steps"
        )
        print(
            table(
                [
                    "mode",
                    "blocked s/ckpt",
                    "vs sync",
                    "samples/s",
                    "vs no saves",
                    "ckpt MB",
                    "peak RSS MB",
                ],
                table_rows(runs),
            )
        )
    return records


if __name__ == "__main__":
    main()
