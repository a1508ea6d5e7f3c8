"""``lr_scaling``: multiply the learning rates by the world size (or its root) once.

One :class:`LrScaling` per Trainer applies the factor at the first ``fit()`` and, on resume,
rescales the optimizer's rates that a checkpoint saved at another world size carries.

Example:
    >>> import torch
    >>> opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
    >>> scaling = LrScaling("sqrt")
    >>> scaling.apply(opt, None, world_size=4, is_main=False)
    >>> scaling.factor, opt.param_groups[0]["lr"]
    (2.0, 0.2)
"""

from __future__ import annotations

import logging
import math
from typing import Any

__all__ = ["LrScaling", "scale_lr"]

log = logging.getLogger("devlayer.train")


def scale_lr(optimizer: Any, scheduler: Any, factor: float) -> None:
    """Multiply every param group's ``lr`` (and ``initial_lr``) and the scheduler's
    ``base_lrs`` by ``factor``."""
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
    if scheduler is not None and hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]


class LrScaling:
    """The Trainer's ``lr_scaling``: ``"linear"``, ``"sqrt"`` or ``None``.

    Attributes:
        mode: The option.
        factor: The factor applied to the rates (1.0 until :meth:`apply`).
        applied: Whether the rates were scaled (once per Trainer, not per ``fit()``).
    """

    def __init__(self, mode: str | None) -> None:
        self.mode = mode
        self.factor = 1.0
        self.applied = False

    def apply(self, optimizer: Any, scheduler: Any, *, world_size: int, is_main: bool) -> None:
        """Scale the rates once for ``world_size`` ranks (rank 0 logs them)."""
        if not self.mode or self.applied:
            return
        factor = world_size if self.mode == "linear" else math.sqrt(world_size)
        scale_lr(optimizer, scheduler, factor)
        self.applied = True
        self.factor = factor
        if is_main and world_size > 1:
            lrs = [g["lr"] for g in optimizer.param_groups]
            log.warning(
                "lr_scaling=%s x%.3g over %d ranks: learning rate(s) %s",
                self.mode,
                factor,
                world_size,
                lrs,
            )

    def rescale(self, optimizer: Any, saved_factor: float) -> None:
        """A checkpoint saved under ``saved_factor`` (another world size) carries rates
        scaled by it: rescale them to this run's factor."""
        if saved_factor != self.factor:
            scale_lr(optimizer, None, self.factor / saved_factor)
