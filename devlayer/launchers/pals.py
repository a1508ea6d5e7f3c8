"""PALS, HPE Cray's ``mpiexec`` on PBS: ``PALS_RANKID``, ``PALS_NODEID``...

Example:
    >>> info = PALS.detect({"PALS_RANKID": "3", "PALS_SIZE": "4", "PALS_LOCAL_RANKID": "1",
    ...                     "PALS_LOCAL_SIZE": "2", "PALS_NODEID": "1", "MASTER_ADDR": "n1",
    ...                     "PALS_APID": "abc"})
    >>> (info.launcher, info.node_rank, info.sources["node_rank"])
    ('pals', 1, 'PALS_NODEID')
"""

from __future__ import annotations

from devlayer.launchers.base import Launcher
from devlayer.launchers.mpi import mpi_detector

__all__ = ["PALS"]

_JOB = ("PALS_APID", "PBS_JOBID")

PALS = Launcher(
    "pals",
    detect=mpi_detector(
        "pals",
        ("PALS_RANKID",),
        ("PALS_SIZE", "PMI_SIZE"),
        ("PALS_LOCAL_RANKID",),
        ("PALS_LOCAL_SIZE", "MPI_LOCALNRANKS"),
        node_vars=("PALS_NODEID",),
        job_vars=_JOB,
    ),
    prefixes=("PALS_",),
    job_id_vars=_JOB,
    family="mpi",
)
