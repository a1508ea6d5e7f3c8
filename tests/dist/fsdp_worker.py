"""Jobs for the FSDP tests, run on real gloo ranks (importable for spawn)."""

from __future__ import annotations

from typing import Any

import torch

import devlayer
from devlayer.train.fsdp import local_numel


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)  # identical initial weights on every rank and strategy
    return torch.nn.Sequential(
        torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
        torch.nn.Linear(64, 1),
    )  # fmt: skip


def losses(strategy: str, steps: int = 8, **fsdp: Any) -> dict[str, Any]:
    """Per-step losses (averaged over ranks) of the same model and data, DDP or FSDP."""
    model = make_model()
    total = sum(p.numel() for p in model.parameters())
    net = devlayer.prepare_model(model, strategy, **({"fsdp": fsdp} if fsdp else {}))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g)
    y = x.sum(1, keepdim=True).sin()
    mine = slice(devlayer.rank(), None, devlayer.world_size())  # this rank's half of the data
    out = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(net(x[mine]), y[mine])
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(float(devlayer.all_reduce(loss.detach(), op="mean")))
    return {
        "losses": out,
        "local": local_numel(net),
        "total": total,
        "out_dtype": str(net(x[:2]).dtype),
        "param_type": type(next(net.parameters())).__name__,
    }


def bf16_by_class() -> dict[str, Any]:
    """FSDP units per Linear, parameters gathered in bf16."""
    return losses("fsdp", 3, modules=[torch.nn.Linear], precision="bf16-mixed")
