"""``Trainer.export``: the trained model's full ``state_dict`` in one file, for inference.

Example:
    >>> import tempfile, torch, devlayer
    >>> from pathlib import Path
    >>> from devlayer.train.strategy import from_name
    >>> _ = devlayer.init(backend="cpu")
    >>> path = Path(tempfile.mkdtemp()) / "model.pt"
    >>> export_model(from_name("ddp"), torch.nn.Linear(1, 1), path) == path
    True
    >>> sorted(torch.load(path, weights_only=True))
    ['bias', 'weight']
    >>> _ = devlayer.shutdown()
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import devlayer
from devlayer.train.checkpoint import write_state_file
from devlayer.train.errors import CheckpointError
from devlayer.train.strategy import Strategy

__all__ = ["export_model"]


def export_model(strategy: Strategy, wrapped: Any, path: str | os.PathLike[str]) -> Path | None:
    """Write ``wrapped``'s full state to ``path`` on rank 0, atomically (tensors only).

    A collective when the strategy gathers shards (``strategy.collective_export``): then a
    failed write raises on every rank.

    Args:
        strategy: Gives the full state (gathered into rank 0's CPU memory under FSDP).
        wrapped: The model as the strategy wrapped it.
        path: The file to write (its folder must exist).

    Returns:
        ``path`` on rank 0, ``None`` on the other ranks.

    Raises:
        CheckpointError: Rank 0 could not write the file.
    """
    collective = strategy.collective_export
    if not collective and not devlayer.is_main():
        return None
    state = strategy.full_state(wrapped)
    target, error = Path(path), None
    if devlayer.is_main():
        try:
            write_state_file(target, state)
        except CheckpointError as exc:
            error = str(exc)
    if collective:
        error = devlayer.broadcast_object(error, src=0)
    if error is not None:
        raise CheckpointError(f"rank 0 could not export the model to {target}: {error}")
    return target if devlayer.is_main() else None
