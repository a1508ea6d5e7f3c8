"""Rank functions for tests/dist/test_strategy.py: a strategy defined here, in the test.

``CompressedDDP`` is what adding a strategy costs: one subclass. It is DDP whose gradient
all-reduce sends fp16 (torch's ``fp16_compress_hook``), counting the hook's calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.utils.data import TensorDataset

import devlayer
from devlayer.train import CheckpointStore
from devlayer.train.strategy import DDPStrategy
from tests.helpers import toy_trainer


class CompressedDDP(DDPStrategy):
    """DDP with fp16 gradient compression: the toy strategy (one class, one hook)."""

    name = "ddp-fp16"

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def wrap(self, model: Any, optimizer: Any = None, precision: Any = None) -> Any:
        wrapped = super().wrap(model, optimizer, precision)
        wrapped.register_comm_hook(None, self._compress)
        return wrapped

    def _compress(self, state, bucket):  # type: ignore[no-untyped-def]  # DDP checks annotations
        self.calls += 1
        return default_hooks.fp16_compress_hook(state, bucket)


def _fit(folder: str, max_steps: int) -> tuple[torch.nn.Module, CompressedDDP, Any]:
    torch.manual_seed(0)
    x = torch.linspace(-1, 1, 128).reshape(64, 2)
    data = TensorDataset(x, x.sum(dim=1, keepdim=True) * 0.5)
    net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    strategy = CompressedDDP()
    trainer = toy_trainer(
        net,
        torch.optim.Adam(net.parameters(), lr=0.05),
        batch_size=16,
        max_steps=max_steps,
        checkpoint_dir=folder,
        checkpoint_every=2,
        strategy=strategy,
    )
    trainer.fit(data)
    return net, strategy, trainer


def compressed_train_and_resume(folder: str) -> dict[str, Any]:
    """6 steps straight; 3 steps then a resume to 6 (new Trainer, new strategy object)."""
    straight, strategy, trainer = _fit(str(Path(folder) / "straight"), 6)
    _fit(str(Path(folder) / "resumed"), 3)
    resumed, again, second = _fit(str(Path(folder) / "resumed"), 6)
    saved, _ = CheckpointStore(Path(folder) / "straight").load()
    return {
        "rank": devlayer.rank(),
        "wrapper": type(trainer.wrapped_model).__name__,
        "calls": strategy.calls,
        "steps": trainer.state.global_step,
        "resumed_calls": again.calls,
        "resumed_from": str(second.resumed_from),
        "straight": [p.detach().tolist() for p in straight.parameters()],
        "resumed": [p.detach().tolist() for p in resumed.parameters()],
        "saved_keys": sorted(saved["model"]),
        "model_keys": sorted(straight.state_dict()),
    }
