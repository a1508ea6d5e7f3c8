"""The Trainer's options checked before anything runs: the value, what to pass instead.

Example:
    >>> positive("grad_accum", 0)
    Traceback (most recent call last):
    ...
    devlayer.errors.InvalidArgumentError: grad_accum=0 must be an int >= 1
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from devlayer.errors import InvalidArgumentError
from devlayer.train.precision import resolve_precision

__all__ = ["check_options", "check_strategy", "positive"]


def check_options(
    *,
    grad_accum: int,
    max_epochs: int | None,
    max_steps: int | None,
    log_every: int,
    preempt_check_every: int,
    checkpoint_every: int | None,
    checkpoint_dir: object,
    clip_grad: float | None,
    lr_scaling: str | None,
    optimize: object,
    strategy: str,
    fsdp: Mapping[str, Any] | None,
    precision: str | None,
    loss_fn: object,
    training_step: object,
) -> None:
    """Refuse Trainer options that cannot work, naming the value and what to pass instead."""
    positive("grad_accum", grad_accum)
    if max_epochs is not None:
        positive("max_epochs", max_epochs)
    positive("log_every", log_every)
    positive("preempt_check_every", preempt_check_every)
    if max_steps is not None:
        positive("max_steps", max_steps)
    if checkpoint_every is not None:
        positive("checkpoint_every", checkpoint_every)
        if checkpoint_dir is None:
            raise InvalidArgumentError("checkpoint_every needs checkpoint_dir")
    if clip_grad is not None and not clip_grad > 0:
        raise InvalidArgumentError(f"clip_grad={clip_grad!r} must be a positive number")
    if lr_scaling not in (None, "linear", "sqrt"):
        raise InvalidArgumentError(f"lr_scaling={lr_scaling!r}: use 'linear', 'sqrt' or None")
    if optimize is not None and not (isinstance(optimize, str) or callable(optimize)):
        raise InvalidArgumentError(
            f"optimize={optimize!r}: use 'ipex', a callable (model, optimizer) -> "
            f"(model, optimizer), or None"
        )
    check_strategy(strategy, fsdp, resolve_precision(precision))
    if loss_fn is None and training_step is None:
        raise InvalidArgumentError(
            "Trainer needs loss_fn (called as loss_fn(model(x), y)) or training_step"
        )


def check_strategy(strategy: str, fsdp: Mapping[str, Any] | None, precision: str) -> None:
    """``strategy`` is ddp or fsdp; ``fsdp`` options only with fsdp, and no own precision."""
    if strategy not in ("ddp", "fsdp"):
        raise InvalidArgumentError(f"strategy={strategy!r}: use 'ddp' or 'fsdp'")
    if strategy != "fsdp":
        if fsdp is not None:
            raise InvalidArgumentError("fsdp= options need strategy='fsdp'")
        return
    if fsdp is not None and "precision" in fsdp:
        raise InvalidArgumentError(
            "fsdp={'precision': ...}: the Trainer maps its own precision= to FSDP's "
            "mixed-precision policy; pass precision='bf16-mixed' to the Trainer instead"
        )


def positive(name: str, value: Any) -> None:
    """``value`` is an int >= 1 (a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(f"{name}={value!r} must be an int >= 1")
