"""OpenMPI's ``mpirun`` (and PRRTE's ``prterun``): ``OMPI_COMM_WORLD_*``.

Example:
    >>> info = OPENMPI.detect({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
    ...                        "OMPI_MCA_ess_base_jobid": "3735879681"})
    >>> (info.launcher, info.rank, info.job_id)
    ('openmpi', 1, 'OMPI_MCA_ess_base_jobid=3735879681')
"""

from __future__ import annotations

from devlayer.launchers.base import Launcher
from devlayer.launchers.mpi import mpi_detector

__all__ = ["OPENMPI"]

_JOB = ("OMPI_MCA_ess_base_jobid", "PMIX_NAMESPACE", "OMPI_MCA_orte_hnp_uri")
_RANK, _SIZE = ("OMPI_COMM_WORLD_RANK",), ("OMPI_COMM_WORLD_SIZE",)

OPENMPI = Launcher(
    "openmpi",
    detect=mpi_detector(
        "openmpi",
        _RANK,
        _SIZE,
        ("OMPI_COMM_WORLD_LOCAL_RANK",),
        ("OMPI_COMM_WORLD_LOCAL_SIZE",),
        job_vars=_JOB,
    ),
    aliases=("mpi",),
    prefixes=("OMPI_",),
    job_id_vars=_JOB,
    family="mpi",
    rank_vars=_RANK,
    size_vars=_SIZE,
)
