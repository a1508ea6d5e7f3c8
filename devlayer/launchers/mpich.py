"""MPICH and Intel MPI (Hydra's ``mpiexec``): ``PMI_RANK``, ``PMI_SIZE``, ``MPI_LOCALRANKID``.

Hydra exports no job id, so a single-node job without ``MASTER_PORT`` keys its port on
the ``hydra_pmi_proxy`` process that started all its local ranks: the one place where
detection reads more than its mapping, and only when given this process's own
``os.environ`` (so it stays pure for the dicts tests pass).

Example:
    >>> info = MPICH.detect({"PMI_RANK": "1", "PMI_SIZE": "2", "I_MPI_JOB_ID": "777"})
    >>> (info.launcher, info.local_rank, info.job_id)
    ('mpich', 1, 'I_MPI_JOB_ID=777')
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from devlayer.errors import LaunchEnvError
from devlayer.launchers.base import PORT_STEP_SLOTS, Launcher, derived_port
from devlayer.launchers.mpi import mpi_detector

__all__ = ["MPICH", "ancestor_named", "proc_parent"]


def proc_parent(pid: int) -> tuple[str, int] | None:
    """``(command name, parent pid)`` of ``pid`` from /proc (Linux), else None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as fh:
            stat = fh.read()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses; split at the last ')'.
    head, _, tail = stat.rpartition(")")
    fields = tail.split()
    if "(" not in head or len(fields) < 2 or not fields[1].isdigit():
        return None
    return head.split("(", 1)[1], int(fields[1])


def ancestor_named(names: Iterable[str], pid: int | None = None) -> int | None:
    """The pid of the nearest ancestor of ``pid`` (default: this process) named in ``names``.

    Example:
        >>> ancestor_named(["no-such-launcher"]) is None
        True
    """
    wanted = set(names)
    start = current = os.getpid() if pid is None else pid
    for _ in range(64):  # a process tree is never this deep; bounds the /proc walk
        found = proc_parent(current)
        if found is None:
            return None
        name, ppid = found
        if current != start and name in wanted:
            return current
        if ppid <= 1:
            return None
        current = ppid
    return None


def _hydra_port(env: Mapping[str, str], num_nodes: int) -> tuple[int, str] | None:
    """A per-job port for MPICH's Hydra on one node, from the proxy all local ranks share.

    Hydra exports no job id (only ``PMI_RANK``, ``PMI_SIZE``, ``PMI_FD``,
    ``MPI_LOCALRANKID``, ``MPI_LOCALNRANKS``), so two ``mpiexec -n 2`` jobs on one node
    would meet on the same default port. Each job has its own ``hydra_pmi_proxy`` per node,
    the ancestor of every local rank (also through ``bash -c`` wrappers).

    Raises:
        LaunchEnvError: The job spans several nodes: each node's proxy has its own pid, so
            no port all nodes agree on can be derived (nor a default one that tells two
            such jobs apart); ``MASTER_PORT`` must be exported.
    """
    if num_nodes > 1:
        raise LaunchEnvError(
            f"MPICH (Hydra) launch across {num_nodes} nodes without MASTER_PORT: Hydra "
            f"exports no job id (none of PMI_JOBID, I_MPI_JOB_ID, PBS_JOBID, SLURM_JOB_ID is "
            f"set), so devlayer cannot derive a port every node agrees on; export "
            f"MASTER_PORT=<free port, same on every rank>, e.g. mpiexec -genv MASTER_PORT 29600"
        )
    if env is not os.environ:
        return None
    proxy = ancestor_named(("hydra_pmi_proxy",))
    if proxy is None:
        return None
    why = f"derived from the hydra_pmi_proxy pid {proxy} (MPICH sets no job id)"
    # A pid has no steps: its low bits take the step slots, so pids spread over all 20000
    # ports (two jobs meet only when their proxies' pids are a multiple of 20000 apart).
    return derived_port(proxy // PORT_STEP_SLOTS, proxy % PORT_STEP_SLOTS), why


_JOB = ("PMI_JOBID", "I_MPI_JOB_ID", "PBS_JOBID", "SLURM_JOB_ID")
_RANK, _SIZE = ("PMI_RANK",), ("PMI_SIZE",)
MPICH = Launcher(
    "mpich",
    detect=mpi_detector(
        "mpich",
        _RANK,
        _SIZE,
        ("MPI_LOCALRANKID",),
        ("MPI_LOCALNRANKS",),
        job_vars=_JOB,
        job_key=lambda env, nodes: _hydra_port(env, nodes),
    ),
    aliases=("intelmpi",),
    prefixes=("PMI_", "MPI_LOCAL", "I_MPI_"),
    job_id_vars=_JOB,
    family="mpi",
    rank_vars=_RANK,
    size_vars=_SIZE,
)
