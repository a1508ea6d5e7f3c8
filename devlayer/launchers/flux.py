"""Flux (``flux run`` / ``flux submit``): ``FLUX_TASK_RANK``, ``FLUX_JOB_SIZE``...

The Flux job shell gives each task ``FLUX_TASK_RANK``, ``FLUX_TASK_LOCAL_ID``,
``FLUX_JOB_SIZE``, ``FLUX_JOB_NNODES`` and ``FLUX_JOB_ID``; its PMI server also sets
``PMI_RANK``/``PMI_SIZE``, so Flux comes before MPICH in the precedence list (the two must
agree). Flux exports no per-node task count: on one node it is the job size; across nodes
it is ``LOCAL_WORLD_SIZE`` when exported, else the job size divided by the node count when
that divides evenly (``flux run -N2 -n4`` places 2 per node), else an error. Nor does it
export a host list, so a job across nodes needs ``MASTER_ADDR`` (an error says so, never
loopback). The port is derived from ``FLUX_JOB_ID`` unless ``MASTER_PORT`` is set.

Example:
    >>> info = FLUX.detect({"FLUX_TASK_RANK": "3", "FLUX_JOB_SIZE": "4",
    ...                     "FLUX_TASK_LOCAL_ID": "1", "FLUX_JOB_NNODES": "2",
    ...                     "FLUX_JOB_ID": "f2xpcQE9K", "MASTER_ADDR": "node1"})
    >>> (info.launcher, info.local_world_size, info.node_rank, info.master_addr)
    ('flux', 2, 1, 'node1')
"""

from __future__ import annotations

from collections.abc import Mapping

from devlayer.errors import LaunchEnvError
from devlayer.launchers.base import (
    BLOCK_PLACEMENT,
    EnvReader,
    Launcher,
    ProcessInfo,
    job_port,
    resolve_master,
)

__all__ = ["FLUX"]

_JOB = ("FLUX_JOB_ID",)


def _local_world(r: EnvReader, world: int, nodes: int) -> int:
    """``LOCAL_WORLD_SIZE``, else the job size on one node or spread evenly, else an error."""
    if r.first(("LOCAL_WORLD_SIZE",)) is not None:
        return r.int("local_world_size", "LOCAL_WORLD_SIZE")
    if nodes >= 1 and world % nodes == 0:
        why = f"FLUX_JOB_SIZE={world} / FLUX_JOB_NNODES={nodes}"
        return r.put("local_world_size", world // nodes, why)
    raise LaunchEnvError(
        f"Flux job of FLUX_JOB_SIZE={world} tasks on FLUX_JOB_NNODES={nodes} nodes: the tasks "
        f"do not divide evenly and Flux exports no per-node count, so devlayer cannot tell "
        f"how many run on this node; use a task count that divides evenly (flux run "
        f"--tasks-per-node=N) or export LOCAL_WORLD_SIZE for every task"
    )


def _detect(env: Mapping[str, str]) -> ProcessInfo | None:
    if "FLUX_TASK_RANK" not in env:
        return None
    r = EnvReader(env, "flux", job_vars=_JOB)
    rank = r.int("rank", "FLUX_TASK_RANK")
    world = r.int("world_size", ("FLUX_JOB_SIZE", "PMI_SIZE"))
    r.int("local_rank", "FLUX_TASK_LOCAL_ID")
    nodes = r.int("num_nodes", "FLUX_JOB_NNODES")
    local = _local_world(r, world, nodes)
    r.put("node_rank", rank // local if local > 0 else 0, BLOCK_PLACEMENT)
    r.check_counts()
    if nodes > 1 and not r.first(("MASTER_ADDR",)):
        raise LaunchEnvError(
            f"Flux job across FLUX_JOB_NNODES={nodes} nodes but MASTER_ADDR is not set, and "
            f"Flux exports no host list to the tasks; export MASTER_ADDR=<host of rank 0> "
            f"for every task (flux run --env=MASTER_ADDR=<host> ...; the job's hosts are "
            f"what flux hostlist prints)"
        )
    addr, port = resolve_master(
        r, single_node=nodes == 1, world_size=world, fallback_port=lambda: job_port(env, _JOB)
    )
    return r.info(master_addr=addr, master_port=port)


FLUX = Launcher(
    "flux",
    detect=_detect,
    prefixes=("FLUX_",),
    job_id_vars=_JOB,
    family="mpi",
)
