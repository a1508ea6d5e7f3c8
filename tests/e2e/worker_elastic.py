"""A torchrun-elastic training job (issue 23): ``python worker_elastic.py FOLDER``.

Trains the indexed regression of tests/dist/elastic_worker.py with a checkpoint every step
and ``allow_world_size_change=True``; every rank appends, per micro-batch,
``{"attempt", "world", "step", "idx"}`` to ``FOLDER/records-<attempt>-rank<r>.jsonl``. A
short sleep per micro-batch leaves the test time to kill an agent mid-run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

import devlayer
from tests.dist.elastic_worker import GLOBAL_BATCH, IndexedData
from tests.helpers import toy_trainer


def main(folder: Path) -> None:
    devlayer.init(backend="cpu", timeout=60)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    world, rank = devlayer.world_size(), devlayer.rank()
    log = folder / f"records-{attempt}-rank{rank}.jsonl"
    torch.manual_seed(1234)
    model = torch.nn.Linear(4, 1).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    trainer: Any = None

    def step(net: Any, batch: Any) -> torch.Tensor:
        x, y, idx = batch
        record = {"attempt": attempt, "world": world, "step": trainer.state.global_step}
        with log.open("a") as fh:
            fh.write(json.dumps({**record, "idx": idx.tolist()}) + "\n")
        time.sleep(0.15)
        return torch.nn.functional.mse_loss(net(x), y)

    trainer = toy_trainer(
        model,
        opt,
        None,
        training_step=step,
        batch_size=GLOBAL_BATCH,
        max_epochs=2,
        checkpoint_dir=folder / "ckpt",
        checkpoint_every=1,
        allow_world_size_change=True,
        metrics_file=folder / "metrics.jsonl",
        seed=7,
    )
    trainer.fit(IndexedData())
    print(f"DONE rank={rank} world={world} step={trainer.state.global_step}", flush=True)
    devlayer.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
