"""The Trainer's checkpoints in one place: when to save, the file work, and resume.

One :class:`Checkpointer` holds the checkpoint folder (a store, locked during ``fit()``)
and the strategy (which saves and restores model and optimizer). The loop asks its three
triggers (:meth:`~Checkpointer.after_step`, :meth:`~Checkpointer.after_epoch`,
:meth:`~Checkpointer.on_preemption`); :meth:`~Checkpointer.save`, :meth:`~Checkpointer.begin`
and :meth:`~Checkpointer.load` are the collective file work. What goes into a payload
beside model and optimizer is the Trainer's own state: it passes it in.

With ``asynchronous=True`` a periodic save (``background=True``) is staged on the training
thread and written by a daemon thread (:mod:`devlayer.train.background`); the next step
boundaries :meth:`~Checkpointer.poll` its outcome, and any other save first waits for it
(:meth:`~Checkpointer.settle`): at most one save is in flight.

Example:
    >>> from devlayer.train.strategy import from_name
    >>> c = Checkpointer(None, every=None, resume="auto", allow_world_size_change=False,
    ...                  strategy=from_name("ddp"))
    >>> (c.after_step(4, last_of_epoch=False, last_step=False), c.after_epoch(finished=True))
    (False, False)
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import devlayer
from devlayer.train.background import (
    FAILED,
    RUNNING,
    WAIT_TIMEOUT,
    Background,
    stage,
)
from devlayer.train.checkpoint import CheckpointStore, rng_state
from devlayer.train.errors import CheckpointError
from devlayer.train.resume import TrainingCheckpoints
from devlayer.train.strategy import Strategy, unwrap

__all__ = ["Checkpointer"]

log = logging.getLogger("devlayer.train")


class Checkpointer:
    """Where, when and how one Trainer saves and resumes.

    Args:
        directory: ``checkpoint_dir`` (``None``: no checkpoints).
        every: ``checkpoint_every`` optimizer steps (``None``: at the run's end only).
        resume: ``"auto"``, a checkpoint path or ``None`` (see :meth:`begin`).
        allow_world_size_change: Load a checkpoint saved with another world size (``True``
            or ``"rescale_lr"``, see :mod:`devlayer.train.elastic`).
        strategy: Saves and restores model and optimizer state.
        asynchronous: Write periodic saves in the background (``checkpoint_async``).
    """

    def __init__(
        self,
        directory: Path | None,
        *,
        every: int | None,
        resume: str | os.PathLike[str] | None,
        allow_world_size_change: bool | str,
        strategy: Strategy,
        asynchronous: bool = False,
    ) -> None:
        self.directory = directory
        self.every = every
        self.resume = resume
        self.allow_world_size_change = allow_world_size_change
        self.strategy = strategy
        self.folder: TrainingCheckpoints | None = None  # during fit(): the lock and run id
        self.asynchronous = asynchronous
        #: The save in flight (at most one), written by a daemon thread.
        self.writer = Background()
        #: Longest wait for the save in flight (seconds), see :meth:`settle`.
        self.wait_timeout = WAIT_TIMEOUT
        #: Rank 0's staged payload of the last background save, copied into by the next
        #: one once that save is settled (kept until :meth:`end`).
        self._staged: Any = None

    @property
    def run_id(self) -> str | None:
        """The checkpoint run's id during ``fit()`` (kept by a resume), else ``None``."""
        return self.folder.store.run_id if self.folder is not None else None

    # ---------------------------------------------------------------- triggers

    def after_step(self, step: int, *, last_of_epoch: bool, last_step: bool) -> bool:
        """Save after optimizer step ``step``: every ``every`` steps, unless the epoch-end
        (or end-of-run) save follows at once (no second write of one step)."""
        every = self.every
        return every is not None and step % every == 0 and not (last_of_epoch or last_step)

    def after_epoch(self, *, finished: bool) -> bool:
        """Save at an epoch's end: with ``every`` set, or when the run is ``finished``."""
        return self.directory is not None and (self.every is not None or finished)

    def on_preemption(self) -> bool:
        """Save where training stopped for SIGTERM (inside an epoch)."""
        return self.directory is not None

    # ---------------------------------------------------------------- file work

    def store(self) -> CheckpointStore:
        """The folder's store (the locked one, with the run id, during ``fit()``)."""
        if self.folder is not None:
            return self.folder.store
        assert self.directory is not None
        return CheckpointStore(self.directory)

    def save(
        self,
        model: Any,
        optimizer: Any,
        payload: Callable[[list[Any], Mapping[str, Any]], dict[str, Any]],
        mine: Mapping[str, Any],
        *,
        step: int,
        epoch: int,
        background: bool = False,
    ) -> Path | None:
        """Write a checkpoint (collective); returns rank 0's path, ``None`` elsewhere.

        A save in flight is waited for first (:meth:`settle`). With ``background`` and
        ``asynchronous`` the state is only staged here and written by a daemon thread;
        the path is then ``None`` (the folder appears once committed).

        Args:
            model: The wrapped model.
            optimizer: Its optimizer.
            payload: ``payload(ranks, states)``: the Trainer's payload around every rank's
                ``mine`` and the strategy's model and optimizer entries.
            mine: This rank's own entry (its RNG state and running sums).
            step: The optimizer step saved.
            epoch: The epoch saved.
            background: A periodic save, which may be written in the background.

        Raises:
            CheckpointError: On every rank alike when rank 0 could not write it (or the
                save in flight failed).
        """
        self.settle(step)
        ranks = devlayer.all_gather_object({"rng": rng_state(), **mine})
        if background and self.asynchronous:
            self._start(model, optimizer, lambda states: payload(ranks, states), step, epoch)
            return None
        states, temp = self.strategy.save_state(
            model, optimizer, lambda: self.store().new_temp(step)
        )
        path: Path | None = None
        error: str | None = None
        if devlayer.is_main():
            try:
                path = self.store().save(
                    payload(ranks, states),
                    step=step,
                    epoch=epoch,
                    world_size=devlayer.world_size(),
                    temp=temp,
                )
            except CheckpointError as exc:
                error = str(exc)
        # Every rank learns the outcome, so a failed write fails the job everywhere alike.
        error = devlayer.broadcast_object(error, src=0)
        if error is not None:
            raise CheckpointError(f"rank 0 could not save the checkpoint: {error}")
        return path

    # ---------------------------------------------------------------- background saves

    def _start(
        self,
        model: Any,
        optimizer: Any,
        payload: Callable[[Mapping[str, Any]], dict[str, Any]],
        step: int,
        epoch: int,
    ) -> None:
        """Stage the state on this thread, then write it in the background (every rank)."""
        store = self.store()
        states, temp, shards_written = self.strategy.background_state(
            model, optimizer, lambda: store.new_temp(step)
        )
        main = devlayer.is_main()
        staged = None
        if main:  # the previous save is settled: its copy is free to be overwritten
            pin = devlayer.device().type != "cpu"
            staged = self._staged = stage(payload(states), pin=pin, into=self._staged)
        world = devlayer.world_size()

        def work() -> Path | None:
            try:
                if shards_written is not None:
                    shards_written()  # this rank's shards are durable (every rank's on rank 0)
                if staged is None:
                    return None
                return store.save(staged, step=step, epoch=epoch, world_size=world, temp=temp)
            except BaseException:
                if main and temp is not None:
                    shutil.rmtree(temp, ignore_errors=True)  # never a half-written checkpoint
                raise

        self.writer.start(step, work)

    def poll(self) -> None:
        """At a step boundary: learn, on every rank alike, whether the save in flight is done.

        One small collective per step while a save is in flight, none otherwise.

        Raises:
            CheckpointError: On every rank, when the save in flight failed on any rank
                (a full disk names ``ENOSPC``); the previous checkpoint stands.
        """
        if self.writer.in_flight:
            self._agree(final=False, next_step=None)

    def settle(self, next_step: int | None = None) -> None:
        """Wait (at most :attr:`wait_timeout` seconds) for the save in flight (collective).

        The rule for a trigger that comes while a save is in flight: wait for it, then save
        (never skip: the newest checkpoint is then always the one the schedule asked for).
        The wait is logged with both steps.

        Raises:
            CheckpointError: On every rank, when the save in flight failed or is still
                running after the wait.
        """
        writer = self.writer
        if not writer.in_flight:
            return
        if writer.status() == RUNNING:
            then = f"saving step {next_step}" if next_step is not None else "going on"
            log.warning(
                "checkpoint step %s is still being written in the background: waiting for it "
                "before %s (at most one save in flight)",
                writer.step,
                then,
            )
        writer.join(self.wait_timeout)
        self._agree(final=True, next_step=next_step)

    def _agree(self, *, final: bool, next_step: int | None) -> None:
        writer = self.writer
        status = int(devlayer.all_reduce(writer.status(), op="max"))
        if status == RUNNING and not final:
            return
        step = writer.step
        if status == FAILED:
            errors = devlayer.all_gather_object(writer.error)
            writer.clear()
            rank, error = next((r, e) for r, e in enumerate(errors) if e is not None)
            raise CheckpointError(
                f"the background save of checkpoint step {step} failed on rank {rank}: "
                f"{error}. The previous checkpoint stands; free space or fix the folder, "
                "then resume (resume='auto')"
            )
        if status == RUNNING:
            raise CheckpointError(
                f"the background save of checkpoint step {step} is still running after "
                f"{self.wait_timeout:g} s on some rank; check the checkpoint folder's disk "
                "(a hung network mount?) and resume from the previous checkpoint"
            )
        writer.clear()
        if devlayer.is_main():
            log.info("checkpoint step %s committed in the background", step)

    def begin(self) -> Path | None:
        """Lock the folder and choose the checkpoint to resume (collective; see
        :meth:`~devlayer.train.resume.TrainingCheckpoints.begin`); ``None``: a fresh run."""
        if self.directory is None:
            return None
        self.folder = TrainingCheckpoints(self.directory)
        return self.folder.begin(self.resume)

    def load(
        self,
        path: Path,
        model: Any,
        optimizer: Any,
        apply: Callable[[Mapping[str, Any], bool], None],
    ) -> None:
        """Verify checkpoint ``path``, restore model and optimizer, then ``apply(payload,
        same_world)`` the Trainer's own state (collective)."""
        assert self.folder is not None
        with self.folder.restoring(path):
            payload, manifest = self.folder.store.load(
                path,
                map_location=devlayer.device(),
                expected_world_size=devlayer.world_size(),
                allow_world_size_change=bool(self.allow_world_size_change),
            )
            self.folder.check_payload(payload, manifest, unwrap(model), path)
            same_world = manifest.get("world_size") == devlayer.world_size()
            self.strategy.load_state(model, optimizer, payload, path, manifest.get("shards"))
            apply(payload, same_world)

    def end(self) -> None:
        """Wait (bounded, no collective) for the save in flight, then release the folder's
        lock (safe on every rank, more than once): the lock covers the writer."""
        writer = self.writer
        if writer.in_flight:
            if writer.status() == RUNNING:
                log.warning(
                    "checkpoint step %s is still being written in the background: waiting "
                    "for it before releasing the checkpoint folder",
                    writer.step,
                )
            if not writer.join(self.wait_timeout):
                log.error(
                    "checkpoint step %s is still being written after %g s; leaving it: "
                    "resume uses the previous checkpoint",
                    writer.step,
                    self.wait_timeout,
                )
            writer.clear()
        self._staged = None
        self.strategy.release_staging()
        if self.folder is not None:
            self.folder.end()
