"""PMIx: ``PMIX_RANK`` from ``srun --mpi=pmix``, PRRTE and other PMIx servers.

Its size may come from SLURM's variables. OpenMPI sets ``PMIX_RANK`` too, so PMIx comes
after the other MPI launchers and is not compared with the one that matched.

Example:
    >>> info = PMIX.detect({"PMIX_RANK": "1", "PMIX_SIZE": "2", "PMIX_NAMESPACE": "job@1"})
    >>> (info.launcher, info.rank, info.job_id)
    ('pmix', 1, 'PMIX_NAMESPACE=job@1')
"""

from __future__ import annotations

from devlayer.launchers.base import Launcher
from devlayer.launchers.mpi import mpi_detector

__all__ = ["PMIX"]

_JOB = ("PMIX_NAMESPACE", "SLURM_JOB_ID")

PMIX = Launcher(
    "pmix",
    detect=mpi_detector(
        "pmix",
        ("PMIX_RANK",),
        ("PMIX_SIZE", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"),
        ("PMIX_LOCAL_RANK", "SLURM_LOCALID"),
        ("PMIX_LOCAL_SIZE",),
        job_vars=_JOB,
    ),
    prefixes=("PMIX_",),
    job_id_vars=_JOB,
    family="mpi",
    compared=False,
)
