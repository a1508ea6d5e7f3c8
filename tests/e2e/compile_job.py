"""Train the small regression with Trainer(compile=...) on one rank; print RESULT {json}."""

from __future__ import annotations

import json
import sys

import torch

import devlayer
from tests.dist.fsdp_trainer_worker import LossLog
from tests.dist.trainer_worker import make_data


def make_model() -> torch.nn.Module:
    # No dropout: inductor draws its own random numbers, so compiled dropout masks differ
    # from eager ones (unless torch._inductor.config.fallback_random is set).
    torch.manual_seed(1234)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def run(compile: bool) -> tuple[list[float], str]:
    model = make_model()
    losses = LossLog()
    trainer = devlayer.Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05),
        torch.nn.functional.mse_loss,
        batch_size=16,
        max_epochs=2,
        compile=compile,
        callbacks=[losses],
        progress=False,
        num_workers=0,
        seed=7,
    )
    trainer.fit(make_data())
    return losses.losses, type(trainer.wrapped_model).__name__


if __name__ == "__main__":
    modes = [arg == "compiled" for arg in sys.argv[1:]]
    try:
        runs = [run(mode) for mode in modes]
        result = {"losses": [r[0] for r in runs], "models": [r[1] for r in runs]}
    except devlayer.DevlayerError as exc:
        result = {"error": type(exc).__name__, "message": str(exc)}
    print("RESULT " + json.dumps(result), flush=True)
