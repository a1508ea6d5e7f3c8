"""Jobs for the asynchronous checkpoint tests (issue 24), importable for spawn."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import torch

import devlayer
from tests.dist.trainer_worker import make_data, make_model, train
from tests.helpers import toy_trainer

#: Epochs of the runs compared bitwise (6 steps each): the resume crosses an epoch boundary.
EPOCHS = 2


def failing_background_saves(root: str, strategies: tuple[str, ...]) -> dict[str, Any]:
    """:func:`failing_background_save` for each strategy in turn, in ``root/<strategy>``
    (one spawn of the ranks for all of them)."""
    return {s: failing_background_save(str(Path(root) / s), s) for s in strategies}


def failing_background_save(checkpoint_dir: str, strategy: str = "ddp") -> dict[str, Any]:
    """Rank 0's second background write hits ENOSPC (every fsync fails from then on).

    Returns the error each rank raised and the step it was at.
    """
    from devlayer.train import checkpoint

    real_fsync, real_commit = checkpoint.os.fsync, checkpoint.CheckpointStore._commit
    try:
        return _fail_second_save(checkpoint_dir, strategy)
    finally:
        checkpoint.CheckpointStore._commit = real_commit  # type: ignore[method-assign]
        checkpoint.os.fsync = real_fsync  # type: ignore[attr-defined]


def _fail_second_save(checkpoint_dir: str, strategy: str) -> dict[str, Any]:
    from devlayer.train import checkpoint

    if devlayer.rank() == 0:
        real_fsync, real_commit = os.fsync, checkpoint.CheckpointStore._commit
        calls = {"commits": 0}

        def counting_commit(self: Any, temp: Path, final: Path) -> None:
            real_commit(self, temp, final)
            calls["commits"] += 1

        def failing_fsync(fd: int) -> None:
            if calls["commits"] >= 1:  # the first checkpoint is committed; fail the next one
                raise OSError(errno.ENOSPC, "No space left on device")
            real_fsync(fd)

        checkpoint.CheckpointStore._commit = counting_commit  # type: ignore[method-assign]
        checkpoint.os.fsync = failing_fsync  # type: ignore[attr-defined]
    steps: list[int] = []

    class Steps(devlayer.train.Callback):
        def on_train_batch_end(self, trainer: Any, loss: Any) -> None:
            steps.append(trainer.state.global_step)

    model = make_model()
    trainer = toy_trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05),
        batch_size=16,
        max_epochs=3,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=2,
        checkpoint_async=True,
        strategy=strategy,
        callbacks=[Steps()],
        resume=None,
    )
    try:
        trainer.fit(make_data())
    except devlayer.train.CheckpointError as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "step": trainer.state.global_step}
    return {"error": "no error", "step": trainer.state.global_step}


class _Release(logging.Handler):
    """Sets ``event`` when a log record contains ``text`` (no sleeps, no timing)."""

    def __init__(self, text: str, event: threading.Event) -> None:
        super().__init__()
        self.text, self.event = text, event
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.seen.append(message)
        if self.text in message:
            self.event.set()


def held_writer(
    checkpoint_dir: str, *, fail_at: int | None = None, term_at: int | None = None
) -> dict[str, Any]:
    """World 1: the background save of step 2 is held before its rename until the Trainer
    logs that it waits for it; ``fail_at``: training_step raises at that step instead;
    ``term_at``: this process gets SIGTERM during that step (a preemption).

    Returns the log, the order of commits, and what a second lock taker saw while held.
    """
    from devlayer.train import checkpoint
    from devlayer.train.checkpoint import CheckpointStore

    release = threading.Event()
    handler = _Release("waiting for it" if fail_at is None else "before releasing", release)
    logger = logging.getLogger("devlayer.train")
    logger.addHandler(handler)
    commits: list[str] = []
    lock_seen: list[str] = []

    def before_commit(temp: Path) -> None:
        if not commits:  # the first background save: held until the Trainer waits for it
            lock_seen.append(_second_locker(checkpoint_dir))
            release.wait(120)
        commits.append(temp.name.split(".")[1])

    checkpoint._before_commit = before_commit
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def step(model_: Any, batch: Any) -> Any:
        if fail_at is not None and trainer.state.global_step == fail_at:
            raise ValueError("user bug at step 3")
        if term_at is not None and trainer.state.global_step == term_at:
            import signal

            os.kill(os.getpid(), signal.SIGTERM)
        x, y = batch
        return torch.nn.functional.mse_loss(model_(x), y)

    trainer = toy_trainer(
        model,
        opt,
        None,
        training_step=step,
        batch_size=16,
        max_epochs=1,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=2,
        checkpoint_async=True,
        resume=None,
        preempt_check_every=1,
    )
    error = None
    try:
        trainer.fit(make_data())
    except (ValueError, devlayer.train.PreemptedError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    finally:
        logger.removeHandler(handler)
        checkpoint._before_commit = None
    store = CheckpointStore(checkpoint_dir)
    return {
        "log": handler.seen,
        "commits": commits,
        "lock_seen": lock_seen,
        "error": error,
        "steps": [p.name for p in store.list()],
        "free_after": _second_locker(checkpoint_dir),
    }


def _second_locker(checkpoint_dir: str) -> str:
    """What another process gets when it tries to take the folder's lock."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from devlayer.train.checkpoint import CheckpointStore\n"
        "from devlayer.train.errors import CheckpointInUseError\n"
        "try:\n"
        "    CheckpointStore(sys.argv[1]).acquire_lock()\n"
        "except CheckpointInUseError:\n"
        "    print('in use')\n"
        "else:\n"
        "    print('free')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, checkpoint_dir],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return out.stdout.strip() or out.stderr[-500:]


def _full(result: dict[str, Any]) -> dict[str, Any]:
    """FSDP's weights are shards (DTensors): gather them (a collective, every rank)."""
    weights = result["weights"]
    result["weights"] = {
        k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in weights.items()
    }
    return result


def async_run(checkpoint_dir: str, strategy: str, stop_after: int) -> dict[str, Any]:
    """Train ``stop_after`` steps with background saves, then resume to the end of 2 epochs.

    Rank 0's background write of step ``stop_after - 1`` is held until the training thread
    has finished step ``stop_after`` (its last save logs that it waits), so a payload that
    was not staged would hold the later step's weights; the run's last (synchronous)
    checkpoint is then removed, so the resume starts from that background checkpoint.
    """
    from devlayer.train import checkpoint

    later = threading.Event()
    real_save = checkpoint.CheckpointStore.save

    def held_save(self: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("step") == stop_after - 1:  # a background save (the triggers: 2, 4)
            later.wait(120)
        return real_save(self, *args, **kwargs)

    # The run's last save (step stop_after, after its optimizer step) logs that it waits.
    handler = _Release(f"before saving step {stop_after}", later)
    logging.getLogger("devlayer.train").addHandler(handler)
    checkpoint.CheckpointStore.save = held_save  # type: ignore[method-assign]
    kw: dict[str, Any] = {"checkpoint_async": True, "strategy": strategy, "val": False}
    try:
        first = train(
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=2,
            max_steps=stop_after,
            **kw,
        )
    finally:
        checkpoint.CheckpointStore.save = real_save  # type: ignore[method-assign]
        logging.getLogger("devlayer.train").removeHandler(handler)
    devlayer.barrier()
    folder = Path(checkpoint_dir)
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".tmp-")]
    if devlayer.is_main():
        shutil.rmtree(folder / f"step-{stop_after:09d}")  # resume from the background one
    devlayer.barrier()
    second = train(checkpoint_dir=checkpoint_dir, checkpoint_every=2, max_epochs=EPOCHS, **kw)
    second["leftovers"] = leftovers + [
        p.name for p in folder.iterdir() if p.name.startswith(".tmp-")
    ]
    second["first_steps"] = first["global_step"]
    return _full(second)


def straight_run(strategy: str) -> dict[str, Any]:
    """2 epochs without checkpoints: the reference."""
    return _full(train(max_epochs=EPOCHS, strategy=strategy, val=False))


def straight_then_async(checkpoint_dir: str, strategy: str, stop_after: int) -> dict[str, Any]:
    """:func:`straight_run`, then :func:`async_run` in the same ranks (one spawn, not two)."""
    straight = straight_run(strategy)
    return {"straight": straight["weights"], **async_run(checkpoint_dir, strategy, stop_after)}
