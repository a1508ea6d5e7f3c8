"""Seeding for reproducible runs on one rank or many.

``seed_everything(seed)`` seeds Python's ``random``, NumPy (when installed) and torch (all
devices) with ``seed + rank``: ranks draw different random numbers (dropout, augmentation),
reruns with the same seed and world size draw the same ones. Data order is not affected by
the offset: :func:`devlayer.prepare_loader` shuffles with ``seed + epoch`` identically on
every rank, and DataLoader workers get seeds derived from ``(seed, rank, epoch, worker)``.
"""

from __future__ import annotations

import random

__all__ = ["rank_seed", "seed_everything"]


def rank_seed(seed: int, rank: int) -> int:
    """The seed a rank uses: ``seed + rank`` (kept within 32 bits for NumPy).

    Example:
        >>> rank_seed(42, 3)
        45
    """
    return (int(seed) + int(rank)) % (2**32)


def seed_everything(seed: int = 0, *, per_rank: bool = True) -> int:
    """Seed ``random``, NumPy and torch; returns the seed this rank used.

    Args:
        seed: The run's base seed.
        per_rank: Add this rank's index (default), so ranks differ but reruns repeat.
            Uses rank 0 when devlayer is not initialized.

    Returns:
        The seed applied on this rank.

    Example:
        >>> import torch
        >>> seed_everything(7, per_rank=False)
        7
        >>> a = torch.rand(1); _ = seed_everything(7, per_rank=False); bool(torch.rand(1) == a)
        True
    """
    import torch

    import devlayer

    rank = devlayer.rank() if per_rank and devlayer.is_initialized() else 0
    value = rank_seed(seed, rank)
    random.seed(value)
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        np.random.seed(value)
    torch.manual_seed(value)  # seeds every device type torch knows
    return value
