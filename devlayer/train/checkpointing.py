"""The Trainer's checkpoints in one place: when to save, the file work, and resume.

One :class:`Checkpointer` holds the checkpoint folder (a store, locked during ``fit()``)
and the strategy (which saves and restores model and optimizer). The loop asks its three
triggers (:meth:`~Checkpointer.after_step`, :meth:`~Checkpointer.after_epoch`,
:meth:`~Checkpointer.on_preemption`); :meth:`~Checkpointer.save`, :meth:`~Checkpointer.begin`
and :meth:`~Checkpointer.load` are the collective file work. What goes into a payload
beside model and optimizer is the Trainer's own state: it passes it in.

Example:
    >>> from devlayer.train.strategy import from_name
    >>> c = Checkpointer(None, every=None, resume="auto", allow_world_size_change=False,
    ...                  strategy=from_name("ddp"))
    >>> (c.after_step(4, last_of_epoch=False, last_step=False), c.after_epoch(finished=True))
    (False, False)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import devlayer
from devlayer.train.checkpoint import CheckpointStore, rng_state
from devlayer.train.errors import CheckpointError
from devlayer.train.resume import TrainingCheckpoints
from devlayer.train.strategy import Strategy, unwrap

__all__ = ["Checkpointer"]


class Checkpointer:
    """Where, when and how one Trainer saves and resumes.

    Args:
        directory: ``checkpoint_dir`` (``None``: no checkpoints).
        every: ``checkpoint_every`` optimizer steps (``None``: at the run's end only).
        resume: ``"auto"``, a checkpoint path or ``None`` (see :meth:`begin`).
        allow_world_size_change: Load a checkpoint saved with another world size (``True``
            or ``"rescale_lr"``, see :mod:`devlayer.train.elastic`).
        strategy: Saves and restores model and optimizer state.
    """

    def __init__(
        self,
        directory: Path | None,
        *,
        every: int | None,
        resume: str | os.PathLike[str] | None,
        allow_world_size_change: bool | str,
        strategy: Strategy,
    ) -> None:
        self.directory = directory
        self.every = every
        self.resume = resume
        self.allow_world_size_change = allow_world_size_change
        self.strategy = strategy
        self.folder: TrainingCheckpoints | None = None  # during fit(): the lock and run id

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
    ) -> Path | None:
        """Write a checkpoint (collective); returns rank 0's path, ``None`` elsewhere.

        Args:
            model: The wrapped model.
            optimizer: Its optimizer.
            payload: ``payload(ranks, states)``: the Trainer's payload around every rank's
                ``mine`` and the strategy's model and optimizer entries.
            mine: This rank's own entry (its RNG state and running sums).
            step: The optimizer step saved.
            epoch: The epoch saved.

        Raises:
            CheckpointError: On every rank alike when rank 0 could not write it.
        """
        ranks = devlayer.all_gather_object({"rng": rng_state(), **mine})
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
        """Release the folder's lock (safe on every rank, more than once)."""
        if self.folder is not None:
            self.folder.end()
