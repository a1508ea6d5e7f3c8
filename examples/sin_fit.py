"""Fit y = sin(2*pi*x) with ``devlayer.Trainer``: one script, any number of ranks.

The script starts its own ranks when no launcher did, and runs as one rank of a job when a
launcher did:

    python examples/sin_fit.py                                     # one process
    python examples/sin_fit.py --nprocs 2                          # starts 2 local ranks
    torchrun --standalone --nproc-per-node=2 examples/sin_fit.py   # torchrun's 2 ranks
    srun -n 2 python examples/sin_fit.py                           # SLURM's 2 tasks
    mpirun -n 2 python examples/sin_fit.py                         # OpenMPI, one node
    mpiexec -n 2 python examples/sin_fit.py                        # MPICH / Intel MPI

``--batch-size`` is the GLOBAL batch: the samples of one optimizer step summed over all
ranks. Each rank gets ``batch_size / world_size`` of them and DDP averages the gradients,
so every world size takes the same optimizer steps on the same batches and ends with
(nearly) the same loss. Rank 0 prints one parseable line at the end:

    final train_loss 0.00253529 val_loss 0.00326092 world_size 2 epochs 40 steps 320
"""

from __future__ import annotations

import argparse
import math

import torch
from torch.utils.data import TensorDataset

import devlayer


def make_data(n: int, *, offset: float = 0.0) -> TensorDataset:
    """``n`` points of y = sin(2*pi*x) on [0, 1] (``offset`` shifts the grid for validation)."""
    x = (torch.arange(n, dtype=torch.float32) + 0.5 + offset) / n
    x = x.clamp(0.0, 1.0).unsqueeze(1)
    return TensorDataset(x, torch.sin(2 * math.pi * x))


def make_model(seed: int) -> torch.nn.Module:
    # Same seed on every rank: the ranks start identical (DDP would also broadcast rank 0's
    # weights), and a 1-rank run starts from the same weights as a 2-rank run.
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(1, 32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 1),
    )


class PrintEvery(devlayer.train.Callback):
    """Rank 0 prints the averaged epoch metrics every ``every`` epochs."""

    def __init__(self, every: int) -> None:
        self.every = every

    def on_epoch_end(self, trainer: devlayer.Trainer, metrics: dict) -> None:
        if self.every and devlayer.is_main() and metrics["epoch"] % self.every == 0:
            print(
                f"epoch {metrics['epoch']:>4}  train_loss {metrics['train_loss']:.5f}  "
                f"val_loss {metrics['val_loss']:.5f}",
                flush=True,
            )


def main(args: argparse.Namespace) -> float:
    """Train on this rank (devlayer.spawn, torchrun, srun or a single process)."""
    with devlayer.init(backend=args.backend):
        model = make_model(args.seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        trainer = devlayer.Trainer(
            model,
            optimizer,
            torch.nn.functional.mse_loss,
            batch_size=args.batch_size,  # global; the Trainer splits it over the ranks
            max_epochs=args.epochs,
            seed=args.seed,
            num_workers=0,  # the data is an in-memory tensor: worker processes only cost
            progress=False,  # no progress bar; PrintEvery reports instead
            callbacks=[PrintEvery(args.print_every)],
        )
        history = trainer.fit(make_data(args.samples), make_data(args.samples // 4, offset=0.5))
        last = history[-1]
        if devlayer.is_main():
            print(
                f"final train_loss {last['train_loss']:.6g} val_loss {last['val_loss']:.6g} "
                f"world_size {devlayer.world_size()} epochs {last['epoch']} "
                f"steps {last['global_step']}",
                flush=True,
            )
    return float(last["train_loss"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--nprocs",
        type=int,
        default=1,
        help="ranks to start on this machine when no launcher (torchrun, srun) started us",
    )
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument(
        "--batch-size", type=int, default=32, help="GLOBAL samples per optimizer step"
    )
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--samples", type=int, default=256, help="training points")
    parser.add_argument(
        "--backend",
        default=None,
        help="cuda, xpu, mps, cpu or auto (default: DEVLAYER_BACKEND or auto-detect)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--print-every", type=int, default=10, help="epochs; 0 = only the end")
    args = parser.parse_args(argv)
    if args.backend in ("auto", ""):
        args.backend = None
    return args


if __name__ == "__main__":
    args = parse_args()
    if devlayer.launched() or args.nprocs == 1:
        main(args)  # torchrun, srun or mpirun started the ranks (--nprocs is not used), or one
    else:
        devlayer.spawn(main, nprocs=args.nprocs, args=(args,), backend=args.backend)
