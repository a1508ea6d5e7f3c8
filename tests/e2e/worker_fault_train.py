"""A training job for the fault tests (run under torchrun).

    worker_fault_train.py CKPT_DIR OUT_FILE [--kill-rank R --kill-at-step K]
                          [--kill-in-write] [--term-at-step K] [--async]

* ``--kill-rank R --kill-at-step K``: in the first attempt, rank R SIGKILLs itself right
  after optimizer step K.
* ``--kill-in-write``: in the first attempt, rank 0 SIGKILLs itself while writing its
  second checkpoint, between serializing and the atomic rename.
* ``--async``: ``checkpoint_async=True`` (periodic saves written in the background; the
  kill in ``--kill-in-write`` then hits rank 0's background writer).
* ``--term-at-step K``: rank 0 sends SIGTERM to the torchrun agent (its parent) after step
  K, as a scheduler's preemption would.

Rank 0 saves the final weights to OUT_FILE (torch.save; read back with weights_only).
"""

from __future__ import annotations

import argparse
import os
import signal

import torch

import devlayer
from devlayer.train import checkpoint
from devlayer.train.fsdp import full_state_dict
from tests.dist.trainer_worker import make_data, make_model
from tests.helpers import toy_trainer

p = argparse.ArgumentParser()
p.add_argument("ckpt")
p.add_argument("out")
p.add_argument("--kill-rank", type=int, default=None)
p.add_argument("--kill-at-step", type=int, default=None)
p.add_argument("--kill-in-write", action="store_true")
p.add_argument("--term-at-step", type=int, default=None)
p.add_argument("--epochs", type=int, default=3)
p.add_argument("--strategy", default="ddp")
p.add_argument("--async", dest="background", action="store_true")
args = p.parse_args()
first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"


class Faults(devlayer.train.Callback):
    def __init__(self) -> None:
        self.termed = False

    def on_train_batch_end(self, trainer, loss):
        step = trainer.state.global_step
        if (
            first_attempt
            and args.kill_at_step is not None
            and step == args.kill_at_step
            and devlayer.rank() == args.kill_rank
        ):
            os.kill(os.getpid(), signal.SIGKILL)
        if (
            args.term_at_step is not None
            and step == args.term_at_step
            and not self.termed
            and devlayer.rank() == 0
        ):
            self.termed = True
            os.kill(os.getppid(), signal.SIGTERM)  # the torchrun agent forwards it to all


devlayer.init(timeout=30)
if args.kill_in_write and first_attempt and devlayer.rank() == 0:
    saves = {"n": 0}

    def crash_before_rename(tmp_path):
        saves["n"] += 1
        if saves["n"] == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint._before_commit = crash_before_rename

model = make_model()
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
trainer = toy_trainer(
    model,
    opt,
    batch_size=16,
    max_epochs=args.epochs,
    checkpoint_dir=args.ckpt,
    checkpoint_every=2,
    checkpoint_async=args.background,
    seed=7,
    callbacks=[Faults()],
    preempt_check_every=1,
    strategy=args.strategy,
)
trainer.fit(make_data())
weights = full_state_dict(trainer.wrapped_model)  # collective under FSDP: rank 0 gets it all
if devlayer.is_main():
    torch.save(weights, args.out)
    print(f"DONE resumed_from={trainer.resumed_from}", flush=True)
devlayer.shutdown()
