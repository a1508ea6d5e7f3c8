"""A training job for the checkpoint-folder tests (issue 14), run as its own process.

    python -m tests.dist.ckpt_job CKPT_DIR [--nprocs N] [--resume auto|none|PATH]
        [--hold-at-step K --hold-until FILE] [--kill-at-step K] [--block-resume-on FIFO]
        [--hidden H] [--epochs E]

* ``--hold-at-step K --hold-until FILE``: rank 0 prints ``HOLDING pid=<pid>`` after
  optimizer step K and waits until FILE exists (the job holds its folder meanwhile).
* ``--kill-at-step K``: rank 0 SIGKILLs itself after step K (the lock holder dies).
* ``--block-resume-on FIFO``: resume blocks opening FIFO (a hung file system) after
  printing ``RESUMING``; one rank only.
* ``--hidden H``: width of the hidden layer (another value: another architecture).

Every rank prints ``RESULT {"rank", "pid", "error_type", "error", "steps"}``; ``steps`` is
the number of optimizer steps this process ran (0 when fit failed before training).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

import devlayer
from tests.dist.trainer_worker import make_data
from tests.helpers import toy_trainer


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("ckpt")
    p.add_argument("--nprocs", type=int, default=1)
    p.add_argument("--resume", default="auto")
    p.add_argument("--hold-at-step", type=int, default=None)
    p.add_argument("--hold-until", default=None)
    p.add_argument("--kill-at-step", type=int, default=None)
    p.add_argument("--block-resume-on", default=None)
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2)
    return p.parse_args(argv)


class _Faults(devlayer.train.Callback):
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.steps = 0
        self._last = -1

    def on_train_batch_end(self, trainer: Any, loss: Any) -> None:
        step = trainer.state.global_step
        if step == self._last:
            return
        self._last = step
        self.steps += 1
        if devlayer.rank() != 0:
            return
        if step == self.args.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == self.args.hold_at_step and self.args.hold_until:
            print(f"HOLDING pid={os.getpid()}", flush=True)
            while not Path(self.args.hold_until).exists():
                time.sleep(0.05)


def _block_resume(fifo: str) -> None:
    from devlayer.train import manifest

    real = manifest.verify

    def hung_verify(folder: Path) -> dict[str, Any]:
        print("RESUMING", flush=True)
        with open(fifo, "rb"):  # blocks until a writer opens it: never, here
            pass
        return real(folder)

    manifest.verify = hung_verify  # type: ignore[assignment]


def job(args: argparse.Namespace) -> None:
    """Fit a small regression with checkpoints every 2 steps; print this rank's RESULT."""
    if args.block_resume_on:
        _block_resume(args.block_resume_on)
    torch.manual_seed(1234)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, args.hidden),
        torch.nn.Tanh(),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(args.hidden, 1),
    )  # trainer_worker.make_model's architecture (with the default --hidden)
    faults = _Faults(args)
    trainer = toy_trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05),
        batch_size=16,
        max_epochs=args.epochs,
        checkpoint_dir=args.ckpt,
        checkpoint_every=2,
        resume=None if args.resume == "none" else args.resume,
        callbacks=[faults],
        seed=7,
    )
    result: dict[str, Any] = {"rank": devlayer.rank(), "pid": os.getpid()}
    try:
        trainer.fit(make_data())
        result.update(error_type=None, error=None)
    except devlayer.DevlayerError as exc:
        result.update(error_type=type(exc).__name__, error=str(exc))
    result["steps"] = faults.steps
    result["resumed_from"] = str(trainer.resumed_from) if trainer.resumed_from else None
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    args = _args()
    if args.nprocs == 1:
        with devlayer.init(backend="cpu"):
            job(args)
    else:
        devlayer.spawn(
            partial(job, args), nprocs=args.nprocs, backend="cpu", timeout=300, join_timeout=400
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
