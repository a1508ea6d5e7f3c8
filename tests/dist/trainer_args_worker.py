"""Rank functions for tests/dist/test_trainer_args.py (Trainer arguments on 2 gloo ranks)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.utils.data import TensorDataset

from devlayer.devices import usable_cpus
from devlayer.errors import InvalidArgumentError
from tests.helpers import toy_trainer


def _data(n: int = 32) -> TensorDataset:
    x = torch.linspace(0, 1, n).unsqueeze(1)
    return TensorDataset(x, 2 * x)


def num_workers_per_rank() -> dict[str, Any]:
    """Fit with as many workers as the process has CPUs on 2 local ranks; report the warning."""
    net = torch.nn.Linear(1, 1)
    trainer = toy_trainer(
        net,
        torch.optim.SGD(net.parameters(), lr=0.1),
        batch_size=8,
        num_workers=usable_cpus(),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer.fit(_data())
        except InvalidArgumentError as exc:
            return {"error": str(exc), "steps": trainer.state.global_step, "warning": ""}
    warning = next((str(w.message) for w in caught if "num_workers" in str(w.message)), "")
    return {"error": None, "steps": trainer.state.global_step, "warning": warning}


def foreign_optimizer(strategy: str) -> dict[str, Any]:
    """fit() with an optimizer over another model's parameters; report the error and weights."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Linear(8, 1))
    other = torch.nn.Linear(1, 1)
    before = [p.detach().clone() for p in net.parameters()]
    trainer = toy_trainer(
        net,
        torch.optim.SGD(other.parameters(), lr=0.1),
        batch_size=8,
        max_epochs=3,
        strategy=strategy,
    )
    error = None
    try:
        trainer.fit(_data())
    except InvalidArgumentError as exc:
        error = str(exc)
    unchanged = all(
        torch.equal(a, b.detach()) for a, b in zip(before, net.parameters(), strict=True)
    )
    return {"error": error, "unchanged": unchanged, "steps": trainer.state.global_step}
