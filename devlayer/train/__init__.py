"""The DDP training layer built on devlayer's public API (no vendor code here).

* :func:`prepare_model`: move to the rank's device, wrap in DDP at world size > 1.
* :func:`prepare_loader`: shard, split the global batch, ``set_epoch`` automatically.
* :class:`Trainer`: AMP, accumulation, clipping, averaged validation, early stopping,
  throughput and atomic checkpoints that resume bit-exactly.
* :func:`seed_everything`: per-rank seeds.
"""

from devlayer.train.checkpoint import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointInUseError,
    CheckpointRunError,
    CheckpointStore,
    CheckpointVersionError,
    CheckpointWorldSizeError,
)
from devlayer.train.data import ShardedLoader, auto_num_workers, prepare_loader
from devlayer.train.errors import WorldSizeChangeError
from devlayer.train.model import prepare_model, unwrap
from devlayer.train.seed import seed_everything
from devlayer.train.trainer import Callback, EarlyStopping, PreemptedError, Trainer

__all__ = [
    "Callback",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointInUseError",
    "CheckpointRunError",
    "CheckpointStore",
    "CheckpointVersionError",
    "CheckpointWorldSizeError",
    "PreemptedError",
    "EarlyStopping",
    "ShardedLoader",
    "Trainer",
    "auto_num_workers",
    "prepare_loader",
    "prepare_model",
    "seed_everything",
    "unwrap",
    "WorldSizeChangeError",
]
