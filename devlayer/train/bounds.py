"""When a run stops: ``max_steps``, ``max_epochs``, early stopping and preemption, in one object.

The Trainer asks one :class:`Bounds` when ``fit()`` starts (:meth:`Bounds.start`), after
each optimizer step (:meth:`Bounds.preempt_now`, :meth:`Bounds.last_step`) and after each
epoch (:meth:`Bounds.end_epoch`); :attr:`Bounds.reason` says which bound ended the run and
:meth:`Bounds.summary` writes the run's last line.

Example:
    >>> b = Bounds(max_epochs=None, max_steps=5, early_stopping=None, preempt_check_every=10)
    >>> (b.max_epochs, b.reached(epoch=3, step=5), b.step_text(2))
    (None, 'max_steps', 'step 2/5')
    >>> Bounds(max_epochs=None, max_steps=None, early_stopping=None,
    ...        preempt_check_every=10).max_epochs  # no bound at all: one epoch
    1
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import devlayer
from devlayer.train.callbacks import EarlyStopping
from devlayer.train.errors import PreemptedError
from devlayer.train.preemption import Preemption

__all__ = ["Bounds"]

log = logging.getLogger("devlayer.train")


class Bounds:
    """The stop rules of one Trainer and, during ``fit()``, why it stopped.

    Args:
        max_epochs: Epochs to run (``None`` with ``max_steps`` unset: 1).
        max_steps: Optimizer steps to run, across epochs.
        early_stopping: An :class:`~devlayer.train.callbacks.EarlyStopping` or ``None``.
        preempt_check_every: Optimizer steps between the ranks' SIGTERM votes.
    """

    def __init__(
        self,
        *,
        max_epochs: int | None,
        max_steps: int | None,
        early_stopping: EarlyStopping | None,
        preempt_check_every: int,
    ) -> None:
        # No bound at all keeps the old default of one epoch; max_steps alone is the bound.
        self.max_epochs = 1 if max_epochs is None and max_steps is None else max_epochs
        self.max_steps = max_steps
        self.early_stopping = early_stopping
        self.preempt_check_every = preempt_check_every
        self.reset()

    def reset(self) -> None:
        """A new ``fit()``: no signal seen, no stop decided."""
        self.preemption = Preemption(self.preempt_check_every)
        self.preempted = False
        self.stopped_early = False
        #: ``"max_steps"``, ``"max_epochs"``, ``"early_stopping"`` or ``None`` (running).
        self.reason: str | None = None

    def _hit(self, bound: str, epoch: int, step: int) -> bool:
        if bound == "max_steps":
            return self.max_steps is not None and step >= self.max_steps
        return self.max_epochs is not None and epoch >= self.max_epochs

    def reached(self, epoch: int, step: int) -> str | None:
        """``"max_steps"`` or ``"max_epochs"`` when that bound is reached (steps first)."""
        return next((b for b in ("max_steps", "max_epochs") if self._hit(b, epoch, step)), None)

    def last_step(self, step: int) -> bool:
        """``step`` is the run's last optimizer step (``max_steps`` reached)."""
        return self._hit("max_steps", 0, step)

    def preempt_now(self, step: int, world_size: int) -> bool:
        """After an optimizer step: True once every rank agreed to stop for SIGTERM."""
        if self.preemption.should_stop(step, world_size):
            self.preempted = True
            return True
        return False

    def start(self, epoch: int, step: int, resumed_from: Path | None) -> str | None:
        """The reason to train no step at all (a bound already reached), or ``None``."""
        self.stopped_early = False
        self.reason = self.reached(epoch, step) or self._stopped_before_resume(
            resumed_from, epoch, step
        )
        return self.reason

    def _stopped_before_resume(
        self, resumed_from: Path | None, epoch: int, step: int
    ) -> str | None:
        """``"early_stopping"`` when the resumed run was ended by early stopping.

        Its restored :class:`EarlyStopping` state already says stop, so this run does no
        step and reports that run's result (resubmitting it trained one more epoch each
        time). A larger ``patience`` or ``early_stopping=None`` trains on.
        """
        es = self.early_stopping
        if resumed_from is None or es is None or not es.stopped:
            return None
        self.stopped_early = True
        if devlayer.is_main():
            log.warning(
                "early stopping on %s ended the run resumed from %s (epoch %d, step %d); "
                "nothing to train: pass a larger patience than %d, or early_stopping=None, "
                "to train on",
                es.monitor,
                resumed_from,
                epoch,
                step,
                es.patience,
            )
        return "early_stopping"

    def end_epoch(
        self, metrics: dict[str, Any], *, completed: bool, epoch: int, step: int
    ) -> str | None:
        """After an epoch's metrics: early stopping's verdict, then the bounds.

        The reason, when there is one, is also recorded as ``metrics["stopped_by"]``.
        """
        es = self.early_stopping
        if completed and es is not None and es.update(metrics):
            self.stopped_early = True
        self.reason = self.reached(epoch, step) or (
            "early_stopping" if self.stopped_early else None
        )
        if self.reason is not None:
            metrics["stopped_by"] = self.reason
        return self.reason

    def epoch_text(self, epoch: int) -> str:
        """``"epoch 3/10"`` (the epoch in progress, 0-based ``epoch``)."""
        bound = f"/{self.max_epochs}" if self.max_epochs is not None else ""
        return f"epoch {epoch + 1}{bound}"

    def step_text(self, step: int) -> str:
        """``"step 7/50"`` (or ``"step 7"`` without ``max_steps``)."""
        return f"step {step}/{self.max_steps}" if self.max_steps is not None else f"step {step}"

    def summary(
        self, history: Sequence[dict[str, Any]], epoch: int, step: int, resumed_from: Path | None
    ) -> str:
        """The run's last line: which bound (or early stopping) ended it, and where."""
        last = history[-1] if history else {}
        where = f"step {step}, epoch {last.get('epoch', epoch)}"
        if last.get("partial"):
            where += f" after {last['batches']}/{last['batches_per_epoch']} batches"
        bounds = {"max_steps": self.max_steps, "max_epochs": self.max_epochs}
        reason = self.reason
        if reason in bounds:
            text = f"stopped: {reason}={bounds[reason]} reached at {where}"
        elif reason == "early_stopping" and self.early_stopping is not None:
            text = f"stopped: early stopping on {self.early_stopping.monitor} at {where}"
        else:
            text = f"stopped at {where}"
        for other, value in bounds.items():
            if value is not None and other != reason:
                hit = "reached too" if self._hit(other, epoch, step) else "not reached"
                text += f"; {other}={value} {hit}"
        if resumed_from is not None:
            text += f" (resumed from {resumed_from})"
        return text

    def preempted_error(self, step: int, epoch: int, checkpoint_dir: Path | None) -> PreemptedError:
        """The :class:`PreemptedError` to raise after the preemption's checkpoint."""
        return self.preemption.error(step=step, epoch=epoch, checkpoint_dir=checkpoint_dir)
