"""MVAPICH's ``mpirun_rsh`` / ``mpiexec``: ``MV2_COMM_WORLD_*``.

Example:
    >>> info = MVAPICH.detect({"MV2_COMM_WORLD_RANK": "1", "MV2_COMM_WORLD_SIZE": "2",
    ...                        "MPIRUN_ID": "99"})
    >>> (info.launcher, info.rank, info.job_id)
    ('mvapich', 1, 'MPIRUN_ID=99')
"""

from __future__ import annotations

from devlayer.launchers.base import Launcher
from devlayer.launchers.mpi import mpi_detector

__all__ = ["MVAPICH"]

_JOB = ("MPIRUN_ID", "SLURM_JOB_ID")
_RANK, _SIZE = ("MV2_COMM_WORLD_RANK",), ("MV2_COMM_WORLD_SIZE",)

MVAPICH = Launcher(
    "mvapich",
    detect=mpi_detector(
        "mvapich",
        _RANK,
        _SIZE,
        ("MV2_COMM_WORLD_LOCAL_RANK",),
        ("MV2_COMM_WORLD_LOCAL_SIZE",),
        job_vars=_JOB,
    ),
    prefixes=("MV2_",),
    job_id_vars=_JOB,
    family="mpi",
    rank_vars=_RANK,
    size_vars=_SIZE,
)
