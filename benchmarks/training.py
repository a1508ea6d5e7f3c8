"""Training-loop throughput: ``devlayer.Trainer`` against a hand-written DDP loop and peers.

Run (CPU/gloo here; unchanged on GPUs, where ``devlayer.device()`` is the accelerator)::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node=1 benchmarks/training.py
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node=2 benchmarks/training.py --quick
    ... --json benchmarks/results/training.jsonl   # raw records, one JSON object per line

Models (``--model``): ``mlp`` (64 -> 256 -> 256 -> 10, ReLU) or ``cnn`` (two 3x3 conv +
max-pool blocks, 3 -> 16 -> 32 channels, on 3x16x16 images, then a linear head), fp32.
Implementations, each training the same model from the same initial weights
(``torch.manual_seed``) on the same synthetic classification data with the same global
batch (256 samples per optimizer step over all ranks), plain SGD, no DataLoader workers:

1. ``devlayer.Trainer(progress=False, log_every=10**9, num_workers=0)``.
2. A hand-written DDP loop in the style of the usual HPC tutorial: ``DistributedSampler``
   + ``set_epoch``, ``DistributedDataParallel``, per-rank batch ``256 // world``,
   ``loss.backward()``, ``opt.step()``, ``opt.zero_grad()``. It is the reference (1.00x).
3. HF Accelerate: ``Accelerator(cpu=True)``, ``prepare(model, opt, loader)``,
   ``accelerator.backward(loss)``.
4. Lightning Fabric (optional, ``pip install devlayer[bench]``): ``Fabric(strategy="ddp")``
   adopting the existing process group, ``setup``, ``setup_dataloaders``,
   ``fabric.backward(loss)``.
5. PyTorch-Ignite (optional): ``idist.auto_model`` / ``auto_optim`` / ``auto_dataloader``
   and ``create_supervised_trainer``, with ``set_epoch`` on every epoch start.

Peers that are not installed are skipped (and listed as such). ``--impls`` runs a subset:
the runner (``python -m benchmarks.run``) starts one process per implementation that way
to measure peak RSS, which a process that ran several implementations cannot attribute.

After every run the ranks compare a checksum of the weights: an implementation whose ranks
disagree did not average gradients, and the run stops with an error instead of reporting
its (meaningless) speed.

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
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import devlayer

if __package__ in (None, ""):  # run as a file (torchrun benchmarks/training.py)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import git_state, med_range, table, versions

GLOBAL_BATCH = 256
IN, HIDDEN, OUT = 64, 256, 10
IMG = (3, 16, 16)
LR = 0.05
SEED = 0
MODEL = "mlp"  # set from --model in main()

# Targets printed next to the results (see docs/performance.md).
TARGET_VS_HAND = 0.98  # Trainer samples/s >= 0.98x the hand-written loop


def make_model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    nn = torch.nn
    if MODEL == "cnn":
        c, h, w = IMG
        return nn.Sequential(
            nn.Conv2d(c, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * (h // 4) * (w // 4), OUT),
        )
    return nn.Sequential(
        nn.Linear(IN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, OUT),
    )


def describe_model() -> str:
    if MODEL == "cnn":
        return f"CNN conv3x3(3->16)+pool, conv3x3(16->32)+pool, linear on {IMG} images"
    return f"MLP {IN}-{HIDDEN}-{HIDDEN}-{OUT}"


def make_data(n: int) -> TensorDataset:
    """Synthetic, learnable classification: labels from a fixed random linear teacher."""
    gen = torch.Generator().manual_seed(1234)
    shape = IMG if MODEL == "cnn" else (IN,)
    x = torch.randn(n, *shape, generator=gen)
    teacher = torch.randn(x[0].numel(), OUT, generator=gen)
    y = (x.flatten(1) @ teacher).argmax(dim=1)
    return TensorDataset(x, y)


class StepClock:
    """Time stamps of every optimizer step, via ``register_step_post_hook``.

    Also records this process's CPU time (all threads: DDP's reducer, gloo) at each step;
    ``StepClock.last`` is the most recent clock, read by ``main`` after a run.
    """

    last: StepClock | None = None

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.stamps: list[float] = []
        self.cpu: list[float] = []
        self._handle = opt.register_step_post_hook(self._hook)
        StepClock.last = self

    def _hook(self, *_: Any) -> None:
        self.stamps.append(time.perf_counter())
        self.cpu.append(time.process_time())

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


def run_fabric(ds: TensorDataset, epochs: int) -> tuple[torch.nn.Module, list[float], float]:
    from lightning.fabric import Fabric

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    clock = StepClock(opt)  # Fabric's optimizer wrapper calls this optimizer's step
    t0 = time.perf_counter()
    world = dist.get_world_size()
    fabric = Fabric(
        accelerator="cpu" if devlayer.device().type == "cpu" else "auto",
        devices=world,
        strategy="ddp" if world > 1 else "auto",
    )
    fabric.launch()  # under torchrun with a process group already there: adopts it
    fmodel, fopt = fabric.setup(model, opt)
    gen = torch.Generator().manual_seed(SEED)
    loader = DataLoader(ds, batch_size=GLOBAL_BATCH // world, shuffle=True, generator=gen)
    floader = fabric.setup_dataloaders(loader)  # DistributedSampler + set_epoch per epoch
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in range(epochs):
        fmodel.train()
        for x, y in floader:
            fopt.zero_grad()
            loss = loss_fn(fmodel(x), y)
            fabric.backward(loss)
            fopt.step()
    clock.close()
    return model, clock.stamps, t0


def run_ignite(ds: TensorDataset, epochs: int) -> tuple[torch.nn.Module, list[float], float]:
    import ignite.distributed as idist
    from ignite.engine import Events, create_supervised_trainer

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    clock = StepClock(opt)
    t0 = time.perf_counter()
    device = devlayer.device()
    imodel = idist.auto_model(model)  # DDP when world > 1 (adopts the native group)
    iopt = idist.auto_optim(opt)
    loader = idist.auto_dataloader(ds, batch_size=GLOBAL_BATCH, shuffle=True, num_workers=0)
    engine = create_supervised_trainer(imodel, iopt, torch.nn.CrossEntropyLoss(), device=device)
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        engine.add_event_handler(
            Events.EPOCH_STARTED, lambda e: sampler.set_epoch(e.state.epoch - 1)
        )
    engine.run(loader, max_epochs=epochs)
    clock.close()
    return model, clock.stamps, t0


Impl = Callable[[TensorDataset, int], tuple[torch.nn.Module, list[float], float]]
#: name -> (function, module that must be importable)
IMPLS: dict[str, tuple[Impl, str | None]] = {
    "hand-written DDP loop": (run_hand, None),
    "devlayer.Trainer": (run_trainer, None),
    "HF Accelerate": (run_accelerate, "accelerate"),
    "Lightning Fabric": (run_fabric, "lightning"),
    "PyTorch-Ignite": (run_ignite, "ignite"),
}
REF = "hand-written DDP loop"
PEER_DISTS = ("accelerate", "lightning", "pytorch-ignite")


def installed(module: str | None) -> bool:
    return module is None or importlib.util.find_spec(module) is not None


def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux ru_maxrss is in KiB; macOS in bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


@torch.no_grad()
def check_in_sync(name: str, model: torch.nn.Module) -> None:
    """Fail loudly when ranks ended with different weights (gradients were not averaged).

    A layer that skipped DDP would train each rank on its own shard, fast and wrong.
    """
    total = sum(p.detach().double().sum() for p in model.parameters()).reshape(1).cpu()
    lo, hi = total.clone(), total.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if abs(float(hi - lo)) > 1e-6 * max(1.0, abs(float(hi))):
        raise RuntimeError(
            f"{name}: ranks ended with different weights (sum {float(lo)} vs {float(hi)}): "
            f"gradients were not synchronized, so its throughput is not comparable"
        )


@torch.no_grad()
def full_loss(model: torch.nn.Module, ds: TensorDataset) -> float:
    model = model.cpu().eval()
    x, y = ds.tensors
    total = 0.0
    for start in range(0, len(x), 4096):
        out = model(x[start : start + 4096])
        total += float(
            torch.nn.functional.cross_entropy(out, y[start : start + 4096], reduction="sum")
        )
    return total / len(x)


# --------------------------------------------------------------------------- reporting


# --------------------------------------------------------------------------- main


def main() -> None:
    global MODEL
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    p.add_argument(
        "--impls",
        default=None,
        help="comma-separated subset of: " + ", ".join(IMPLS) + " (default: all installed)",
    )
    p.add_argument("--quick", action="store_true", help="fewer samples, epochs and repeats")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--samples", type=int, default=None, help="data set size")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (first is warm-up)")
    p.add_argument("--json", default=None, help="append raw records (JSON lines) here")
    args = p.parse_args()
    MODEL = args.model
    repeats = args.repeats or (3 if args.quick else 5)
    default_n = {"mlp": (4096, 32768), "cnn": (2048, 8192)}[MODEL]
    n_samples = args.samples or default_n[0 if args.quick else 1]
    epochs = args.epochs or (3 if args.quick else 4)
    if epochs < 2:
        p.error("--epochs must be >= 2 (the first epoch is excluded as warm-up)")
    wanted = list(IMPLS) if args.impls is None else [n.strip() for n in args.impls.split(",")]
    unknown = [n for n in wanted if n not in IMPLS]
    if unknown:
        p.error(f"--impls: unknown {unknown}; choose from {list(IMPLS)}")
    names = [n for n in wanted if installed(IMPLS[n][1])]
    skipped = [n for n in wanted if n not in names]

    wall0 = time.perf_counter()
    t_pg = time.perf_counter()
    if not dist.is_initialized():
        # Name the backend: a group created without one reports "undefined" from
        # dist.get_backend(), and Ignite then skips its DDP wrap (no gradient sync at all).
        accel = (
            torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        )
        comm = dist.Backend.default_device_backend_map.get(accel.type, "gloo") if accel else "gloo"
        dist.init_process_group(backend=comm)
    t_pg = time.perf_counter() - t_pg
    devlayer.init()  # adopts the default process group
    rank, world = dist.get_rank(), dist.get_world_size()
    main_rank = rank == 0
    if GLOBAL_BATCH % world:
        raise SystemExit(f"world size {world} must divide the global batch {GLOBAL_BATCH}")

    ds = make_data(n_samples)
    steps_per_epoch = -(-n_samples // GLOBAL_BATCH)
    res: dict[str, dict[str, list[float]]] = {
        n: {"sps": [], "ttfs": [], "loss": [], "cpu": []} for n in names
    }
    records: list[dict[str, Any]] = []
    for rep in range(repeats):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            dist.barrier()
            model, stamps, t0 = IMPLS[name][0](ds, epochs)
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
            assert StepClock.last is not None
            cpu = StepClock.last.cpu
            cpu_t = torch.tensor([cpu[-1] - cpu[steps_per_epoch - 1]], dtype=torch.float64)
            dist.all_reduce(cpu_t)
            cpu_ms = float(cpu_t) / world / warm_steps * 1e3  # mean over ranks
            check_in_sync(name, model)
            loss = full_loss(model, ds)
            res[name]["sps"].append(sps)
            res[name]["ttfs"].append(ttfs * 1e3)
            res[name]["cpu"].append(cpu_ms)
            res[name]["loss"].append(loss)
            records.append(
                {
                    "type": "result",
                    "impl": name,
                    "model": MODEL,
                    "repeat": rep,
                    "world_size": world,
                    "samples": n_samples,
                    "epochs": epochs,
                    "warm_steps": warm_steps,
                    "warm_s": warm_s,
                    "samples_per_s": sps,
                    "time_to_first_step_s": ttfs,
                    "cpu_ms_per_step": cpu_ms,
                    "final_loss_rank0": loss,
                }
            )
            del model
    wall = time.perf_counter() - wall0
    rss = [0.0] * world
    rss[rank] = peak_rss_mb()
    rss_t = torch.tensor(rss, dtype=torch.float64)
    dist.all_reduce(rss_t)  # every rank's figure, gathered on the CPU
    records.append(
        {
            "type": "memory",
            "impls": names,
            "model": MODEL,
            "world_size": world,
            "peak_rss_mb_per_rank": rss_t.tolist(),
        }
    )

    if main_rank:
        st = devlayer.state()
        ref = res[REF]["sps"] if REF in res else None
        rows = []
        for name in names:
            ratios = [a / b for a, b in zip(res[name]["sps"], ref, strict=True)] if ref else []
            rows.append(
                [
                    name,
                    med_range(res[name]["sps"], "{:.0f}"),
                    med_range(ratios, "{:.3f}") + "x" if ratios else "n/a (no reference run)",
                    med_range(res[name]["ttfs"]),
                    med_range(res[name]["cpu"], "{:.2f}"),
                    med_range(res[name]["loss"], "{:.5f}"),
                ]
            )
        head = [
            "implementation",
            "warm samples/s",
            "ratio vs hand-written",
            "time to first step (ms)",
            "CPU ms/step (mean of ranks)",
            "final loss (full data set)",
        ]
        load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
        installed_peers = ", ".join(
            f"{k} {v or 'not installed'}" for k, v in versions(PEER_DISTS).items()
        )
        print(
            f"## Training throughput: {MODEL}, backend {st.backend}, "
            f"comm {dist.get_backend_config()}, world size {world}\n\n"
            f"{describe_model()}, fp32, SGD lr={LR}, global batch {GLOBAL_BATCH}, "
            f"{n_samples} samples ({steps_per_epoch} steps/epoch), {epochs} epochs per run "
            f"(first excluded), {repeats} repeats; median [min, max] over repeats.\n"
            f"date {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M:%S} UTC, "
            f"git {git_state()}, python {platform.python_version()}, torch {torch.__version__}, "
            f"{installed_peers}, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
            f"load average {load[0]:.2f}, process group init {t_pg * 1e3:.0f} ms (untimed), "
            f"wall {wall:.1f} s\n"
        )
        print(table(head, rows))
        if skipped:
            print(f"\nskipped (not installed; pip install devlayer[bench]): {', '.join(skipped)}")
        print(
            "\npeak RSS per rank (MiB, whole process, all implementations above): "
            + ", ".join(f"{v:.0f}" for v in rss_t.tolist())
        )
        tr = res.get("devlayer.Trainer")
        if tr is not None and ref is not None:
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
