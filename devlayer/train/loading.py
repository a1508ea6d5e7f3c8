"""What the Trainer loads: its loaders from the global batch size, and batches on the device.

:func:`fit_loader` turns ``fit()``'s data into a :class:`~devlayer.train.data.ShardedLoader`
whose micro-batches make up the global batch (``batch_size`` over all ranks and
``grad_accum`` micro-batches); :func:`to_device` moves one batch (a tensor, or a mapping,
list or tuple of them) to the device.

Example:
    >>> import torch
    >>> to_device({"x": torch.zeros(2), "n": 3}, torch.device("cpu"))
    {'x': tensor([0., 0.]), 'n': 3}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import devlayer
from devlayer.errors import InvalidArgumentError
from devlayer.train.data import ShardedLoader, prepare_loader

__all__ = ["fit_loader", "to_device"]


def fit_loader(
    data: Any,
    *,
    batch_size: int | None,
    grad_accum: int,
    seed: int,
    num_workers: int | str,
    shuffle: bool,
) -> ShardedLoader:
    """The loader of ``fit()``'s ``data``: a ShardedLoader is taken as it is.

    Args:
        data: A Dataset, a DataLoader (its batch size is the global one when ``batch_size``
            is ``None``) or a :class:`~devlayer.train.data.ShardedLoader`.
        batch_size: Global samples per optimizer step, or ``None``.
        grad_accum: Micro-batches per optimizer step.
        seed: The data order's seed.
        num_workers: Workers per rank, or ``"auto"``.
        shuffle: Training data (shuffled and padded so every rank runs the same steps);
            ``False``: evaluation data, sharded exactly.

    Raises:
        InvalidArgumentError: No batch size, or one that ``world_size x grad_accum`` does
            not divide (naming both and the multiple to use).
    """
    if isinstance(data, ShardedLoader):
        return data
    st = devlayer.state()
    per_step = batch_size
    if per_step is None:
        per_step = getattr(data, "batch_size", None)
        if per_step is None:
            raise InvalidArgumentError(
                "Trainer needs batch_size (global samples per optimizer step) when "
                "train_data is a Dataset"
            )
    if per_step % (st.world_size * grad_accum):
        raise InvalidArgumentError(
            f"batch_size={per_step} must split evenly into world_size={st.world_size} x "
            f"grad_accum={grad_accum} micro-batches; use a multiple of "
            f"{st.world_size * grad_accum}"
        )
    return prepare_loader(
        data,
        per_step // grad_accum,
        shuffle=shuffle,
        seed=seed,
        num_workers=num_workers,
        pad=shuffle,  # training pads (same steps on every rank); evaluation is exact
        # Training: a whole number of global batches per epoch, the same at any world size
        # (an exact resume at another one continues the same global order).
        step_samples=per_step if shuffle else None,
    )


def to_device(batch: Any, device: Any) -> Any:
    """``batch`` with its tensors on ``device`` (non-blocking), other values as they are."""
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: to_device(v, device) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
