"""Training-loop throughput: ``devlayer.Trainer`` against a hand-written DDP loop and peers.

Run (CPU/gloo here; unchanged on GPUs, where ``devlayer.device()`` is the accelerator)::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node=1 benchmarks/training.py
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node=2 benchmarks/training.py --quick
    ... --json benchmarks/results/training.jsonl   # raw records, one JSON object per line

Implementations, each training the same MLP (64 -> 256 -> 256 -> 10, ReLU, fp32) from the
same initial weights (``torch.manual_seed``) on the same synthetic classification data with
the same global batch (256 samples per optimizer step over all ranks), plain SGD, no
DataLoader workers:

1. ``devlayer.Trainer(progress=False, log_every=10**9, num_workers=0)``.
2. A hand-written DDP loop in the style of the usual HPC tutorial: ``DistributedSampler``
   + ``set_epoch``, ``DistributedDataParallel``, per-rank batch ``256 // world``,
   ``loss.backward()``, ``opt.step()``, ``opt.zero_grad()``. It is the reference (1.00x).
3. HF Accelerate: ``Accelerator(cpu=True)``, ``prepare(model, opt, loader)``,
   ``accelerator.backward(loss)``.

The process group is created once, raw (``dist.init_process_group`` from torchrun's env),
before anything is timed; ``devlayer.init()`` and Accelerate's ``PartialState`` adopt it.

Method: every optimizer step is time-stamped by a post-step hook registered on the
underlying ``torch.optim`` optimizer (the same hook for all three). *Time to first step* runs
from just before the implementation's own set-up (``Trainer(...)``, the DDP wrap,
``Accelerator()``; the model is already built) to the end of the first optimizer step.
*Warm throughput* is the global samples of the steps after the first epoch divided by the
time from the last step of the first epoch to the last step of the run. Both are the
slowest rank's. *Final loss* is the mean cross-entropy of the trained model over the whole
data set, evaluated on rank 0 after the run (not timed). One repeat runs every
implementation once, in A B C order on even repeats and C B A on odd ones; tables give the
median [min, max] over repeats, and the ratio vs the hand-written loop is the median
[min, max] of the per-repeat ratios.

This is a benchmark that prints tables, not a test: it asserts nothing.
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
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import devlayer

GLOBAL_BATCH = 256
IN, HIDDEN, OUT = 64, 256, 10
LR = 0.05
SEED = 0

# Targets printed next to the results (see docs/performance.md).
TARGET_VS_HAND = 0.98  # Trainer samples/s >= 0.98x the hand-written loop


def make_model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    return torch.nn.Sequential(
        torch.nn.Linear(IN, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, OUT),
    )


def make_data(n: int) -> TensorDataset:
    """Synthetic, learnable classification: labels from a fixed random linear teacher."""
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(n, IN, generator=gen)
    teacher = torch.randn(IN, OUT, generator=gen)
    y = (x @ teacher).argmax(dim=1)
    return TensorDataset(x, y)


class StepClock:
    """Time stamps of every optimizer step, via ``register_step_post_hook``."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.stamps: list[float] = []
        self._handle = opt.register_step_post_hook(self._hook)

    def _hook(self, *_: Any) -> None:
        self.stamps.append(time.perf_counter())

    def close(self) -> None:
        self._handle.remove()


# --------------------------------------------------------------------------- implementations


def run_trainer(ds: TensorDataset, epochs: int) -> tuple[torch.nn.Module, list[float], float]:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    clock = StepClock(opt)
    t0 = time.perf_counter()
    trainer = devlayer.Trainer(
        model,
        opt,
        torch.nn.functional.cross_entropy,
        batch_size=GLOBAL_BATCH,
        max_epochs=epochs,
        seed=SEED,
        progress=False,
        log_every=10**9,
        num_workers=0,
        resume=None,
    )
    trainer.fit(ds)
    clock.close()
    return model, clock.stamps, t0


def run_hand(ds: TensorDataset, epochs: int) -> tuple[torch.nn.Module, list[float], float]:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    clock = StepClock(opt)
    t0 = time.perf_counter()
    device = devlayer.device()  # the tutorial's torch.device(f"cuda:{local_rank}") / cpu
    world = dist.get_world_size()
    ddp = DDP(model.to(device))
    sampler: DistributedSampler[Any] = DistributedSampler(ds, shuffle=True, seed=SEED)
    loader = DataLoader(ds, batch_size=GLOBAL_BATCH // world, sampler=sampler, num_workers=0)
    loss_fn = torch.nn.CrossEntropyLoss()
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        ddp.train()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            loss = loss_fn(ddp(x), y)
            loss.backward()
            opt.step()
    clock.close()
    return model, clock.stamps, t0


def run_accelerate(ds: TensorDataset, epochs: int) -> tuple[torch.nn.Module, list[float], float]:
    from accelerate import Accelerator

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    clock = StepClock(opt)  # on the torch optimizer; Accelerate wraps it
    t0 = time.perf_counter()
    acc = Accelerator(cpu=devlayer.device().type == "cpu")
    gen = torch.Generator().manual_seed(SEED)
    loader = DataLoader(
        ds, batch_size=GLOBAL_BATCH // acc.num_processes, shuffle=True, generator=gen
    )
    pmodel, popt, ploader = acc.prepare(model, opt, loader)
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in range(epochs):
        pmodel.train()
        for x, y in ploader:
            popt.zero_grad()
            loss = loss_fn(pmodel(x), y)
            acc.backward(loss)
            popt.step()
    clock.close()
    return model, clock.stamps, t0


IMPLS: dict[str, Callable[[TensorDataset, int], tuple[torch.nn.Module, list[float], float]]] = {
    "hand-written DDP loop": run_hand,
    "devlayer.Trainer": run_trainer,
    "HF Accelerate": run_accelerate,
}
REF = "hand-written DDP loop"


@torch.no_grad()
def full_loss(model: torch.nn.Module, ds: TensorDataset) -> float:
    model = model.cpu().eval()
    x, y = ds.tensors
    return float(torch.nn.functional.cross_entropy(model(x), y))


# --------------------------------------------------------------------------- reporting


def med_range(values: list[float], fmt: str = "{:.1f}") -> str:
    return (
        f"{fmt.format(statistics.median(values))} "
        f"[{fmt.format(min(values))}, {fmt.format(max(values))}]"
    )


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def git_rev() -> str:
    try:
        rev = subprocess.run(
            ["git", "describe", "--always", "--dirty=+dirty"],
            capture_output=True,
            text=True,
            check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        rev = "unknown"
    return rev


# --------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer samples, epochs and repeats")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--samples", type=int, default=None, help="data set size")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (first is warm-up)")
    p.add_argument("--json", default=None, help="append raw records (JSON lines) here")
    args = p.parse_args()
    repeats = args.repeats or (3 if args.quick else 5)
    n_samples = args.samples or (8192 if args.quick else 32768)
    epochs = args.epochs or (3 if args.quick else 4)
    if epochs < 2:
        p.error("--epochs must be >= 2 (the first epoch is excluded as warm-up)")

    wall0 = time.perf_counter()
    t_pg = time.perf_counter()
    if not dist.is_initialized():
        dist.init_process_group()  # torch picks gloo for CPU and the vendor backend for GPUs
    t_pg = time.perf_counter() - t_pg
    devlayer.init()  # adopts the default process group
    rank, world = dist.get_rank(), dist.get_world_size()
    main_rank = rank == 0
    if GLOBAL_BATCH % world:
        raise SystemExit(f"world size {world} must divide the global batch {GLOBAL_BATCH}")

    ds = make_data(n_samples)
    steps_per_epoch = -(-n_samples // GLOBAL_BATCH)
    names = list(IMPLS)
    res: dict[str, dict[str, list[float]]] = {n: {"sps": [], "ttfs": [], "loss": []} for n in names}
    records: list[dict[str, Any]] = []
    for rep in range(repeats):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            dist.barrier()
            model, stamps, t0 = IMPLS[name](ds, epochs)
            if len(stamps) != steps_per_epoch * epochs:
                raise RuntimeError(
                    f"{name}: {len(stamps)} steps, expected {steps_per_epoch * epochs}"
                )
            warm_start = stamps[steps_per_epoch - 1]
            warm_steps = len(stamps) - steps_per_epoch
            local = torch.tensor([stamps[-1] - warm_start, stamps[0] - t0], dtype=torch.float64)
            dist.all_reduce(local, op=dist.ReduceOp.MAX)  # slowest rank
            warm_s, ttfs = local.tolist()
            sps = warm_steps * GLOBAL_BATCH / warm_s
            loss = full_loss(model, ds)
            res[name]["sps"].append(sps)
            res[name]["ttfs"].append(ttfs * 1e3)
            res[name]["loss"].append(loss)
            records.append(
                {
                    "type": "result",
                    "impl": name,
                    "repeat": rep,
                    "world_size": world,
                    "samples": n_samples,
                    "epochs": epochs,
                    "warm_steps": warm_steps,
                    "warm_s": warm_s,
                    "samples_per_s": sps,
                    "time_to_first_step_s": ttfs,
                    "final_loss_rank0": loss,
                }
            )
            del model
    wall = time.perf_counter() - wall0

    if main_rank:
        st = devlayer.state()
        ref = res[REF]["sps"]
        rows = []
        for name in names:
            ratios = [a / b for a, b in zip(res[name]["sps"], ref, strict=True)]
            rows.append(
                [
                    name,
                    med_range(res[name]["sps"], "{:.0f}"),
                    med_range(ratios, "{:.3f}") + "x",
                    med_range(res[name]["ttfs"]),
                    med_range(res[name]["loss"], "{:.5f}"),
                ]
            )
        head = [
            "implementation",
            "warm samples/s",
            "ratio vs hand-written",
            "time to first step (ms)",
            "final loss (full data set)",
        ]
        load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
        print(
            f"## Training throughput: backend {st.backend}, comm {dist.get_backend()}, "
            f"world size {world}\n\n"
            f"MLP {IN}-{HIDDEN}-{HIDDEN}-{OUT}, fp32, SGD lr={LR}, global batch {GLOBAL_BATCH}, "
            f"{n_samples} samples ({steps_per_epoch} steps/epoch), {epochs} epochs per run "
            f"(first excluded), {repeats} repeats; median [min, max] over repeats.\n"
            f"date {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M:%S} UTC, "
            f"git {git_rev()}, python {platform.python_version()}, torch {torch.__version__}, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
            f"load average {load[0]:.2f}, process group init {t_pg * 1e3:.0f} ms (untimed), "
            f"wall {wall:.1f} s\n"
        )
        print(table(head, rows))
        tr = res["devlayer.Trainer"]
        r_hand = statistics.median(a / b for a, b in zip(tr["sps"], ref, strict=True))
        peers = [n for n in names if n != "devlayer.Trainer"]
        best_peer = max(statistics.median(res[n]["sps"]) for n in peers)
        print(
            f"\nTrainer / hand-written (median of per-repeat ratios): {r_hand:.3f}x "
            f"(target >= {TARGET_VS_HAND}); Trainer median {statistics.median(tr['sps']):.0f} "
            f"vs best peer median {best_peer:.0f} samples/s; time to first step "
            f"{statistics.median(tr['ttfs']):.1f} vs hand-written "
            f"{statistics.median(res[REF]['ttfs']):.1f} ms."
        )
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "a") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
        sys.stdout.flush()
    devlayer.shutdown()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
