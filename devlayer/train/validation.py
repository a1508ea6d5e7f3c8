"""The Trainer's validation: per-rank sums of the validation metrics, then one collective.

A :class:`Validator` runs the validation forwards of one rank and sums each metric weighted
by batch size, on the device, without a collective; :func:`reduce_epoch` joins those sums
with the epoch's training sums in ONE ``all_reduce``.

Example:
    >>> import torch
    >>> from devlayer.train.precision import Precision
    >>> from devlayer.train.strategy import from_name
    >>> cpu = torch.device("cpu")
    >>> v = Validator(strategy=from_name("ddp"), precision=Precision("32", cpu),
    ...               loss_fn=torch.nn.functional.mse_loss, validation_step=None,
    ...               device=cpu)
    >>> v.sums(torch.nn.Linear(1, 1), None)
    {}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import devlayer
from devlayer.torchcompat import float_dtype
from devlayer.train.loading import to_device
from devlayer.train.metrics import batch_len, is_classification
from devlayer.train.options import check_metrics
from devlayer.train.precision import Precision
from devlayer.train.rng import rng_state, set_rng_state
from devlayer.train.strategy import Strategy

__all__ = ["Validator", "reduce_epoch"]


class Validator:
    """Validation forwards of one rank.

    Args:
        strategy: Gives the model to validate and how many filler forwards FSDP needs.
        precision: Its autocast.
        loss_fn: ``loss_fn(model(x), y)``: ``val_loss`` (and ``val_accuracy`` for
            classification) when no ``validation_step`` is given.
        validation_step: ``validation_step(model, batch) -> dict`` of per-batch means.
        device: Where batches go and the sums stay.
    """

    def __init__(
        self,
        *,
        strategy: Strategy,
        precision: Precision,
        loss_fn: Callable[..., Any] | None,
        validation_step: Callable[[Any, Any], Mapping[str, Any]] | None,
        device: Any,
    ) -> None:
        self.strategy = strategy
        self.precision = precision
        self.loss_fn = loss_fn
        self.validation_step = validation_step
        self.device = device
        # Metric sums accumulate in float64 on the device (float32 on MPS, which has no
        # float64); with Python floats of the same dtype they cost one all_reduce per epoch.
        self.sum_dtype = float_dtype(device)

    def sums(self, wrapped: Any, loader: Any) -> dict[str, Any]:
        """Per-rank sums of the validation metrics over ``loader`` (``None``: no data), each
        weighted by batch size, and ``_val_count``; on the device, no collective here."""
        import torch

        sums: dict[str, Any] = {}
        if loader is None:
            return sums
        model = self.strategy.validation_model(wrapped)
        model.eval()
        count = 0
        # Forwards that are collectives (FSDP): as many as the rank with the most batches.
        fillers = self.strategy.validation_fillers(len(loader))
        batch = None
        with torch.no_grad(), self.precision.autocast():
            for batch in loader:
                batch = to_device(batch, self.device)
                size = batch_len(batch)
                values = self.values(model, batch)
                for key, value in values.items():
                    value = torch.as_tensor(value, device=self.device).detach()
                    value = value.to(self.sum_dtype)
                    sums[key] = sums.get(key, 0) + value * size
                count += size
            for _ in range(fillers):
                self.values(model, batch)
        sums["_val_count"] = float(count)
        return sums

    def values(self, model: Any, batch: Any) -> dict[str, Any]:
        """One batch's metrics: ``validation_step``'s, or loss (and accuracy) by ``loss_fn``."""
        if self.validation_step is not None:
            return check_metrics(self.validation_step(model, batch), "validation_step")
        x, y = batch
        out = model(x)
        assert self.loss_fn is not None
        values = {"val_loss": self.loss_fn(out, y)}
        if is_classification(out, y):
            values["val_accuracy"] = (out.argmax(dim=-1) == y).float().mean()
        return values


def reduce_epoch(
    validator: Validator,
    wrapped: Any,
    loader: Any,
    train: tuple[Any, int, float],
    *,
    completed: bool,
) -> dict[str, Any]:
    """Validate, then sum the epoch's metrics over all ranks in ONE collective.

    A partial epoch validates under a saved RNG state, so resuming from it continues
    bit-exactly.

    Args:
        validator: This rank's validation.
        wrapped: The model as the strategy wrapped it.
        loader: The validation loader, or ``None``.
        train: The epoch's training loss sum (a device tensor, not changed), samples and
            seconds on this rank.
        completed: Whether the epoch ran to its end.

    Returns:
        The sums over all ranks (as :func:`devlayer.train.metrics.epoch_metrics` takes them).
    """
    if completed:
        sums = validator.sums(wrapped, loader)
    else:
        saved = rng_state()
        sums = validator.sums(wrapped, loader)
        set_rng_state(saved)
    loss_sum, samples, seconds = train
    sums["_train_loss"] = loss_sum.clone()  # reduced in place; the running sum stays
    sums["_train_count"] = float(samples)
    sums["_seconds"] = float(seconds)
    return devlayer.all_reduce(sums, op="sum")  # ONE collective: floats join the sums' buffer
