"""Rank functions for hangs in a DataLoader worker and in a checkpoint save (issue 22),
run under devlayer.spawn by tests/dist/test_hang_places.py."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

import devlayer


class BlocksOnRank(Dataset):
    """16 items; with ``stuck``, item 8 and later block in the DataLoader worker (until the
    rank that started the worker is gone, so no worker outlives the test)."""

    def __init__(self, stuck: bool) -> None:
        self.stuck = stuck
        self.parent = os.getpid()

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> torch.Tensor:
        if i >= 8 and self.stuck:
            worker_stuck_in_getitem(self.parent)
        return torch.ones(2)


def worker_stuck_in_getitem(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.05)
    os._exit(0)


def dataloader_worker_stuck() -> None:
    """Rank 1's DataLoader worker blocks (item 8 on) while rank 0 waits in all_reduce."""
    loader = DataLoader(BlocksOnRank(devlayer.rank() == 1), batch_size=4, num_workers=1)
    for batch in loader:
        devlayer.all_reduce(batch.sum())


_real_save = torch.save


def slow_save(*args: Any, **kwargs: Any) -> None:
    """torch.save that never returns when the checkpoint store calls it (a hung network
    mount, say); other callers (the object collectives pickle with it) get the real one."""
    if not sys._getframe(1).f_code.co_filename.endswith(f"train{os.sep}checkpoint.py"):
        return _real_save(*args, **kwargs)
    while True:
        time.sleep(0.05)


def save_hangs(checkpoint_dir: str, asynchronous: bool) -> None:
    """A 2-rank Trainer saving every 2 steps whose rank 0 blocks in torch.save."""
    if devlayer.rank() == 0:
        torch.save = slow_save  # type: ignore[assignment]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = TensorDataset(torch.rand(64, 4), torch.rand(64, 1))
    trainer = devlayer.Trainer(
        model,
        opt,
        torch.nn.functional.mse_loss,
        batch_size=4,
        max_steps=6,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=2,
        checkpoint_async=asynchronous,
        resume=None,
        progress=False,
        num_workers=0,
    )
    trainer.fit(data)
