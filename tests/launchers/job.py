"""One user-style script for the real-launcher tests: the same file under every launcher.

    python job.py quick                      # init, all_reduce, print where this rank stands
    python job.py train DIR [--step-sleep S] # 2-rank Trainer with checkpoints in DIR, resume auto
    python job.py spawn                      # the "spawn or not" pattern of seed scripts
    python job.py hold SECONDS               # init, stay in the job for a while, all_reduce

Each rank prints one ``RESULT {json}`` line (written with one os.write, so lines of
different ranks never interleave). Only devlayer's public API is used.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from typing import Any

import devlayer


def emit(record: dict[str, Any]) -> None:
    os.write(1, ("RESULT " + json.dumps(record, sort_keys=True) + "\n").encode())


def where() -> dict[str, Any]:
    info = devlayer.launchers.detect(os.environ)
    return {
        "rank": info.rank,
        "world_size": info.world_size,
        "local_rank": info.local_rank,
        "local_world_size": info.local_world_size,
        "launcher": info.launcher,
        "rank_source": info.sources.get("rank"),
        "master_port": info.master_port,
        "port_source": info.sources.get("master_port"),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_step_id": os.environ.get("SLURM_STEP_ID"),
        "pid": os.getpid(),
        "file": devlayer.__file__,
    }


def quick() -> None:
    record = where()
    with devlayer.init():
        total = devlayer.all_reduce(devlayer.rank() + 1)
        record.update(devlayer_rank=devlayer.rank(), sum=total)
        if os.environ.get("JOB_WITH_ACCELERATE") == "1":
            from accelerate import Accelerator

            acc = Accelerator()
            record.update(accelerate_rank=acc.process_index, accelerate_world=acc.num_processes)
    emit(record)


def hold(seconds: float) -> None:
    record = where()
    with devlayer.init():
        devlayer.barrier()
        time.sleep(seconds)  # overlap with the other job on the same node
        record["sum"] = devlayer.all_reduce(devlayer.rank() + 1)
    emit(record)


def train(directory: str, step_sleep: float, epochs: int) -> None:
    import torch
    from torch.utils.data import TensorDataset

    class Pace(devlayer.train.Callback):
        """Slow the steps down so a test can signal the job mid-run."""

        def on_train_batch_end(self, trainer: Any, loss: Any) -> None:
            if devlayer.is_main():
                os.write(1, f"STEP {trainer.state.global_step}\n".encode())
            time.sleep(step_sleep)

    record = where()
    with devlayer.init():
        g = torch.Generator().manual_seed(0)
        x = torch.rand(96, 4, generator=g) * 2 - 1
        y = x @ torch.tensor([[1.5], [-2.0], [0.5], [1.0]]) + 0.3
        torch.manual_seed(1234)
        model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        trainer = devlayer.Trainer(
            model,
            torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
            torch.nn.functional.mse_loss,
            batch_size=16,
            max_epochs=epochs,
            checkpoint_dir=directory,
            checkpoint_every=2,
            resume="auto",
            progress=False,
            num_workers=0,
            seed=7,
            preempt_check_every=1,
            callbacks=[Pace()],
        )
        try:
            history = trainer.fit(TensorDataset(x, y))
        except devlayer.train.PreemptedError as exc:
            record.update(preempted=str(exc), step=trainer.state.global_step)
            emit(record)
            sys.exit(3)
        digest = hashlib.sha256()
        for name, value in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        record.update(
            step=trainer.state.global_step,
            checksum=digest.hexdigest(),
            resumed_from=str(trainer.resumed_from) if trainer.resumed_from else None,
            final_loss=history[-1]["train_loss"] if history else None,
        )
    emit(record)


def _spawned(tag: str) -> dict[str, Any]:
    return {"rank": devlayer.rank(), "world_size": devlayer.world_size(), "pid": os.getpid()}


def spawn() -> None:
    # Written the way seed scripts do it: spawn from __main__. Under a launcher devlayer
    # runs the function in place instead of starting a second job.
    results = devlayer.spawn(_spawned, nprocs=2, args=("x",))
    info = devlayer.launchers.detect(os.environ)
    emit(
        {
            "rank": info.rank,
            "launched": devlayer.launched(),
            "pid": os.getpid(),
            "result_ranks": [r["rank"] for r in results],
            "result_worlds": [r["world_size"] for r in results],
            "result_pids": [r["pid"] for r in results],
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["quick", "train", "spawn", "hold"])
    parser.add_argument("arg", nargs="?")
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    if args.mode == "quick":
        quick()
    elif args.mode == "hold":
        hold(float(args.arg or 2))
    elif args.mode == "train":
        train(args.arg, args.step_sleep, args.epochs)
    else:
        spawn()


if __name__ == "__main__":
    main()
