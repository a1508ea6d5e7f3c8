"""A hand-written DDP training loop on devlayer's smallest surface.

devlayer gives the set-up and the collectives; the rest is plain PyTorch (DDP and
DistributedSampler). Nothing names a vendor or a launcher:

    python examples/custom_loop.py                                     # one process
    torchrun --standalone --nproc-per-node=2 examples/custom_loop.py   # two ranks
    srun -n 2 python examples/custom_loop.py                           # SLURM

The devlayer calls used are ``init``, ``device``, ``rank``, ``world_size``, ``all_reduce``
and ``barrier``. (``devlayer.prepare_model`` and ``devlayer.prepare_loader`` do the DDP
wrapping and the sharded loader in one line each; ``devlayer.Trainer`` does the whole loop.)
"""

from __future__ import annotations

import argparse

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import devlayer


def make_data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 8, generator=g) * 2 - 1
    w = torch.linspace(-1.0, 1.0, 8).unsqueeze(1)
    return TensorDataset(x, x @ w + 0.1 * torch.randn(n, 1, generator=g))


def main(epochs: int, batch_size: int, lr: float) -> None:
    # set_default_device=False: this loop places every tensor itself, and the samplers
    # below draw their random numbers on the CPU, which an accelerator default device
    # would get in the way of.
    with devlayer.init(set_default_device=False):
        dev = devlayer.device()  # cuda:<local rank>, xpu:<n>, mps or cpu
        rank, world = devlayer.rank(), devlayer.world_size()
        if batch_size % world:
            raise SystemExit(f"--batch-size {batch_size} must be a multiple of {world} ranks")

        torch.manual_seed(0)  # identical initial weights on every rank
        model = torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1)
        ).to(dev)
        if world > 1:
            # device_ids only for indexed accelerators (cuda:1, xpu:0); None on cpu.
            model = DistributedDataParallel(
                model, device_ids=[dev.index] if dev.index is not None else None
            )
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

        train, val = make_data(2048, seed=1), make_data(512, seed=2)
        # Each rank reads its own 1/world of the data; batch_size is the global batch.
        train_sampler = DistributedSampler(train, num_replicas=world, rank=rank, seed=0)
        val_sampler = DistributedSampler(val, num_replicas=world, rank=rank, shuffle=False)
        per_rank = batch_size // world
        train_loader = DataLoader(train, batch_size=per_rank, sampler=train_sampler)
        val_loader = DataLoader(val, batch_size=per_rank, sampler=val_sampler)

        val_loss = float("nan")
        for epoch in range(epochs):
            train_sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on all ranks
            model.train()
            for x, y in train_loader:
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                loss = torch.nn.functional.mse_loss(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()  # DDP averages the gradients over the ranks here
                opt.step()

            model.eval()
            # Per-rank sums on the device (float32 works on every device type, MPS included).
            sums = {
                "loss": torch.zeros((), device=dev),
                "count": torch.zeros((), device=dev),
            }
            with torch.no_grad():
                for x, y in val_loader:
                    x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                    sums["loss"] += torch.nn.functional.mse_loss(model(x), y, reduction="sum")
                    sums["count"] += len(x)
            sums = devlayer.all_reduce(sums, op="sum")  # ONE collective for the whole dict
            val_loss = (sums["loss"] / sums["count"]).item()
            if rank == 0:
                print(
                    f"epoch {epoch + 1}/{epochs} val_loss {val_loss:.5f} world_size {world}",
                    flush=True,
                )
        devlayer.barrier()  # everyone finished before rank 0 reports and the group closes
        if rank == 0:
            print(f"done: val_loss {val_loss:.5f} on {world} rank(s), device {dev.type}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="a hand-written DDP loop on devlayer")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64, help="GLOBAL batch per step")
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()
    main(args.epochs, args.batch_size, args.lr)
