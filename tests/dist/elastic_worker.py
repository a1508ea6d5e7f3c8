"""Training jobs for the world-size-change tests (issue 23): they record, per optimizer
step, the sample indices every rank trained on (importable for spawn)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

import devlayer
from tests.helpers import toy_trainer

#: 100 samples, global batch 8: 13 steps an epoch (the last one padded from the epoch's
#: start), 26 in the 2 epochs of a run.
N_SAMPLES = 100
GLOBAL_BATCH = 8
EPOCHS = 2


class IndexedData(Dataset):
    """A regression whose items carry their index: ``(x, y, index)``, float64."""

    def __init__(self, n: int = N_SAMPLES) -> None:
        g = torch.Generator().manual_seed(3)
        self.x = torch.rand(n, 4, generator=g, dtype=torch.float64) * 2 - 1
        w = torch.tensor([[1.5], [-2.0], [0.5], [1.0]], dtype=torch.float64)
        self.y = self.x @ w + 0.3

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.x[i], self.y[i], i


def run(
    folder: str,
    tag: str,
    *,
    max_steps: int | None = None,
    allow: bool | str = True,
    strategy: str = "ddp",
    grad_accum: int = 1,
    metrics_file: str | None = None,
    ckpt: str = "ckpt",
) -> dict[str, Any]:
    """Train (resuming from ``folder/<ckpt>`` when it holds a checkpoint); every rank
    appends ``{"step", "idx"}`` per micro-batch to ``folder/<tag>-rank<r>.jsonl``."""
    torch.manual_seed(1234)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
    ).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.9)
    log = Path(folder) / f"{tag}-rank{devlayer.rank()}.jsonl"
    trainer: Any = None

    def step(net: Any, batch: Any) -> torch.Tensor:
        x, y, idx = batch
        with log.open("a") as fh:
            fh.write(json.dumps({"step": trainer.state.global_step, "idx": idx.tolist()}) + "\n")
        return torch.nn.functional.mse_loss(net(x), y)

    trainer = toy_trainer(
        model,
        opt,
        None,
        training_step=step,
        batch_size=GLOBAL_BATCH,
        grad_accum=grad_accum,
        max_epochs=EPOCHS,
        max_steps=max_steps,
        checkpoint_dir=str(Path(folder) / ckpt),
        checkpoint_every=1,
        allow_world_size_change=allow,
        scheduler=sched,
        strategy=strategy,
        metrics_file=metrics_file,
        seed=7,
    )
    history = trainer.fit(IndexedData())
    weights = trainer.strategy.full_state(trainer.wrapped_model)
    return {
        "rank": devlayer.rank(),
        "global_step": trainer.state.global_step,
        "grad_accum": trainer.grad_accum,
        "history": history,
        "weights": {k: v.detach().cpu().clone() for k, v in weights.items()},
    }


def steps_seen(folder: Path, tags: list[str]) -> dict[int, list[int]]:
    """Optimizer step -> the sorted sample indices all ranks trained on in it (over the
    runs ``tags``, e.g. the parts of an interrupted run)."""
    seen: dict[int, list[int]] = {}
    for tag in tags:
        for path in sorted(folder.glob(f"{tag}-rank*.jsonl")):
            for line in path.read_text().splitlines():
                record = json.loads(line)
                seen.setdefault(record["step"], []).extend(record["idx"])
    return {step: sorted(idx) for step, idx in sorted(seen.items())}
