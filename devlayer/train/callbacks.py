"""Trainer hooks: the :class:`Callback` base class and :class:`EarlyStopping`.

Callbacks run on every rank, at the same points of the loop; a callback that decides
something (stop, save) must decide it from values that every rank shares (the epoch
metrics are averaged over all ranks before ``on_epoch_end``).

Example:
    >>> stop = EarlyStopping(monitor="val_loss", patience=2)
    >>> [stop.update({"val_loss": v}) for v in (1.0, 0.9, 0.95, 0.97)]
    [False, False, False, True]
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from devlayer.errors import InvalidArgumentError

__all__ = ["Callback", "EarlyStopping", "is_finite_number"]


@dataclass
class EarlyStopping:
    """Stop when a validation metric stops improving, or once it reaches a target.

    Decided on metrics already averaged over all ranks, so every rank stops at the same
    epoch.

    Args:
        monitor: A key of the epoch metrics, e.g. ``"val_loss"`` or ``"val_accuracy"``.
        mode: ``"min"`` or ``"max"``.
        patience: Epochs without improvement (or, with ``target``, epochs at or past the
            target in a row) before stopping.
        min_delta: Smallest change that counts as an improvement.
        target: Stop after ``patience`` consecutive epochs that reach this value (the seed
            tutorial's "target accuracy" rule).

    Its state (best value, counters, the metric it watched) goes into the Trainer's
    checkpoints, so a resumed run stops at the same epoch as an uninterrupted one, and a
    run it ended stays ended when resubmitted (:attr:`stopped` is already True).
    """

    monitor: str = "val_loss"
    mode: str = "min"
    patience: int = 3
    min_delta: float = 0.0
    target: float | None = None
    best: float | None = None
    bad_epochs: int = 0
    hits: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.monitor, str) or not self.monitor:
            raise InvalidArgumentError(
                f"EarlyStopping(monitor={self.monitor!r}) must name a key of the epoch "
                "metrics, e.g. 'val_loss' or 'val_accuracy'"
            )
        if self.mode not in ("min", "max"):
            raise InvalidArgumentError(f"EarlyStopping(mode={self.mode!r}): use 'min' or 'max'")
        patience = self.patience
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise InvalidArgumentError(f"EarlyStopping(patience={patience!r}) must be an int >= 1")
        if not (is_finite_number(self.min_delta) and self.min_delta >= 0):
            raise InvalidArgumentError(
                f"EarlyStopping(min_delta={self.min_delta!r}) must be a finite number >= 0 "
                "(the smallest change that counts as an improvement; mode says which way)"
            )
        if self.target is not None and not is_finite_number(self.target):
            raise InvalidArgumentError(
                f"EarlyStopping(target={self.target!r}) must be a finite number or None"
            )

    def update(self, metrics: Mapping[str, Any]) -> bool:
        """Record one epoch; True means stop now."""
        if self.monitor not in metrics:
            raise InvalidArgumentError(
                f"EarlyStopping monitors {self.monitor!r}, but the epoch metrics are "
                f"{sorted(metrics)}; pass val_data or monitor another key"
            )
        value = float(metrics[self.monitor])
        better = (
            (lambda a, b: a < b - self.min_delta)
            if self.mode == "min"
            else (lambda a, b: a > b + self.min_delta)
        )
        if self.target is not None:
            reached = value <= self.target if self.mode == "min" else value >= self.target
            self.hits = self.hits + 1 if reached else 0
            return self.hits >= self.patience
        if self.best is None or better(value, self.best):
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        return self.stopped

    @property
    def stopped(self) -> bool:
        """True when the epochs recorded so far meet the stop rule (as after a resume).

        Example:
            >>> stop = EarlyStopping(patience=1)
            >>> stop.load_state_dict({"best": 0.5, "bad_epochs": 1, "hits": 0})
            >>> stop.stopped
            True
        """
        if self.target is not None:
            return self.hits >= self.patience
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        """The counters and the metric they watched, for checkpoints."""
        return {
            "best": self.best,
            "bad_epochs": self.bad_epochs,
            "hits": self.hits,
            "monitor": self.monitor,
            "mode": self.mode,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the counters (states saved before ``monitor``/``mode`` were kept load too).

        Counters of another metric or direction (``monitor="val_loss"`` saved, now
        ``"val_accuracy"``) mean nothing for this rule: they are not loaded, a warning says
        so, and this rule starts counting from the resumed epoch.
        """
        saved = (state.get("monitor", self.monitor), state.get("mode", self.mode))
        if saved != (self.monitor, self.mode):
            warnings.warn(
                f"EarlyStopping: the checkpoint's counters watched {saved[0]!r} "
                f"(mode={saved[1]!r}), this one watches {self.monitor!r} (mode={self.mode!r}); "
                "they are not restored and early stopping counts from this epoch on",
                stacklevel=2,
            )
            return
        self.best, self.bad_epochs, self.hits = state["best"], state["bad_epochs"], state["hits"]


def is_finite_number(value: Any) -> bool:
    """A finite int or float (a bool, a numeric string or an int too large for a float is not).

    Example:
        >>> [is_finite_number(v) for v in (1, 0.5, True, "1", float("nan"), 10**400)]
        [True, True, False, False, False, False]
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int past the float range
        return False


class Callback:
    """Hooks the Trainer calls on every rank; override the ones you need.

    ``trainer`` is the :class:`~devlayer.train.trainer.Trainer` (typed ``Any`` here so this
    module does not import the one that imports it).
    """

    def on_fit_start(self, trainer: Any) -> None:
        """Before the first epoch (after resuming)."""

    def on_train_batch_end(self, trainer: Any, loss: Any) -> None:
        """After each micro-batch's backward, before the optimizer step it may trigger.

        ``loss`` is the micro-batch's loss, a device tensor (reading it syncs). The
        gradients are in place, not yet clipped or applied. ``trainer.state.batches_done``
        already counts this micro-batch, ``trainer.state.global_step`` counts the optimizer
        steps done *before* it: on a micro-batch that ends an accumulation window (every
        one at ``grad_accum=1``) the step it triggers is not counted yet, so the value is
        one less than after that step.
        """

    def on_train_epoch_end(self, trainer: Any) -> None:
        """After an epoch's last training step (or the run's last), before validation.

        Runs before the epoch's one metrics reduction, also when ``max_steps`` ended the
        run inside the epoch.
        """

    def on_epoch_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        """After validation, with the epoch's averaged metrics.

        ``metrics["partial"]`` is True when ``max_steps`` ended training inside the epoch.
        """

    def on_fit_end(self, trainer: Any, history: list[dict[str, Any]]) -> None:
        """After the last epoch."""
