"""Epoch metrics of the Trainer: from the ranks' summed values to one history entry.

Every rank sums its values (losses weighted by batch size, sample counts, seconds); one
all_reduce adds them over the ranks; :func:`epoch_metrics` turns the sums into the means
and rates of a history entry, :func:`epoch_line` into the printed summary line.

Example:
    >>> m = epoch_metrics({"_train_loss": 6.0, "_train_count": 4.0, "_seconds": 2.0},
    ...                   epoch=1, global_step=2, world_size=2, lr=0.1)
    >>> m["train_loss"], m["samples_per_sec"]
    (1.5, 4.0)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "append_metrics",
    "as_float",
    "batch_len",
    "epoch_line",
    "epoch_metrics",
    "is_classification",
]


def epoch_metrics(
    sums: Mapping[str, Any],
    *,
    epoch: int,
    global_step: int,
    world_size: int,
    lr: float,
    reference_throughput: float | None = None,
) -> dict[str, Any]:
    """One history entry from the epoch's sums over all ranks.

    Args:
        sums: ``_train_loss`` (batch-size weighted), ``_train_count``, ``_seconds`` (summed
            over ranks), ``_val_count`` and each validation metric's weighted sum.
        epoch: The epoch number (1-based).
        global_step: Optimizer steps so far.
        world_size: Ranks that contributed.
        lr: The first param group's learning rate.
        reference_throughput: World-size-1 samples/s for ``scaling_efficiency``.
    """
    count = max(as_float(sums["_train_count"]), 1)
    seconds = as_float(sums["_seconds"]) / world_size  # mean epoch time over ranks
    samples = as_float(sums["_train_count"])
    metrics: dict[str, Any] = {
        "epoch": epoch,
        "train_loss": as_float(sums["_train_loss"]) / count,
    }
    val_count = as_float(sums.get("_val_count", 0))
    for key, value in sums.items():
        if not key.startswith("_") and val_count:
            metrics[key] = as_float(value) / val_count
    metrics["samples_per_sec"] = samples / seconds if seconds > 0 else 0.0
    metrics["epoch_time"] = seconds
    metrics["global_step"] = global_step
    metrics["world_size"] = world_size
    metrics["lr"] = lr
    if reference_throughput:
        metrics["scaling_efficiency"] = metrics["samples_per_sec"] / (
            world_size * reference_throughput
        )
    return metrics


def epoch_line(metrics: Mapping[str, Any], max_epochs: int | None, step_text: str) -> str:
    """The summary line printed after each epoch (``epoch 2/10 | train_loss ... | step 40``)."""
    epoch = f"epoch {metrics['epoch']}"
    if max_epochs is not None:
        epoch += f"/{max_epochs}"
    if metrics.get("partial"):
        epoch += f" (partial: {metrics['batches']}/{metrics['batches_per_epoch']} batches)"
    parts = [epoch, f"train_loss {metrics['train_loss']:.4f}"]
    parts += [f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("val_")]
    parts.append(f"{metrics['samples_per_sec']:.1f} samples/s")
    parts.append(f"{metrics['epoch_time']:.2f}s")
    if "scaling_efficiency" in metrics:
        parts.append(f"scaling efficiency {metrics['scaling_efficiency']:.0%}")
    parts.append(step_text)
    return " | ".join(parts)


def append_metrics(path: Path, metrics: Mapping[str, Any]) -> None:
    """Append one JSON line to the metrics file (creating its folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(metrics, sort_keys=True) + "\n")


def as_float(value: Any) -> float:
    """A Python float from a number or a one-element tensor."""
    return float(value.item()) if hasattr(value, "item") else float(value)


def batch_len(batch: Any) -> int:
    """Samples in a batch: the first dimension of its first tensor (1 if it has none)."""
    first = batch
    while isinstance(first, (list, tuple)) and first:
        first = first[0]
    if isinstance(first, Mapping) and first:
        first = next(iter(first.values()))
    shape = getattr(first, "shape", None)
    return int(shape[0]) if shape else 1


def is_classification(out: Any, y: Any) -> bool:
    """``(N, classes)`` scores for ``N`` integer labels: accuracy is reported too."""
    return (
        getattr(out, "ndim", 0) == 2
        and getattr(y, "ndim", -1) == 1
        and not y.is_floating_point()
        and out.shape[0] == y.shape[0]
    )
