"""An elastic training job (issue 23): ``python worker_elastic.py FOLDER [HOLD [AT_WORLD]]``.

Trains the indexed regression of tests/dist/elastic_worker.py with a checkpoint every step
and ``allow_world_size_change=True``; every rank appends, per micro-batch,
``{"attempt", "world", "step", "idx"}`` to ``FOLDER/records-<attempt>-rank<r>.jsonl``. The
attempt is rank 0's start time, shared by all ranks: torchrun's restart count does not
grow when the workers restart for a membership change, so it cannot tell attempts apart. A
short sleep per micro-batch leaves the test time to kill an agent mid-run. With ``HOLD``,
a run at world size ``AT_WORLD`` (default 1) waits in step ``HOLD`` until it gets SIGTERM
(torchrun stopping it to let an agent join, ``scancel --signal=TERM``): the test cannot
lose a race with the end of the run. Rank 0 ends with ``DONE ...`` and ``WEIGHTS {json}``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

import devlayer
from tests.dist.elastic_worker import GLOBAL_BATCH, IndexedData
from tests.helpers import toy_trainer


def main(folder: Path, hold: int | None, at_world: int) -> None:
    devlayer.init(backend="cpu", timeout=60)
    attempt = devlayer.broadcast(time.time_ns())
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
        while world == at_world and hold is not None and record["step"] >= hold:
            if trainer.preemption.signal is not None:
                break
            time.sleep(0.1)
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
        preempt_check_every=1,
    )
    trainer.fit(IndexedData())
    print(f"DONE rank={rank} world={world} step={trainer.state.global_step}", flush=True)
    weights = trainer.strategy.full_state(trainer.wrapped_model)
    if rank == 0:
        print("WEIGHTS " + json.dumps({k: v.flatten().tolist() for k, v in weights.items()}))
    devlayer.shutdown()


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[2:]]
    main(Path(sys.argv[1]), args[0] if args else None, args[1] if len(args) > 1 else 1)
