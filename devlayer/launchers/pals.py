"""PALS, HPE Cray's ``mpiexec`` on PBS (Aurora, Polaris): ``PALS_*``, ``PMI_*``, ``PBS_*``.

PALS gives each rank ``PALS_RANKID``, ``PALS_LOCAL_RANKID``, ``PALS_NODEID`` (and
``PALS_LOCAL_SIZE`` on recent versions); Cray PMI adds ``PMI_SIZE``, ``PMI_LOCAL_RANK`` and
``PMI_LOCAL_SIZE``; PBS gives ``PBS_JOBID`` and ``PBS_NODEFILE`` (one line per node, in
the order ``mpiexec`` places ranks). The ranks on this node come from ``PALS_LOCAL_SIZE``,
``PMI_LOCAL_SIZE`` or an exported ``LOCAL_WORLD_SIZE``; without them a job is one node only
when ``PBS_NODEFILE`` lists one host, else an error. Across nodes the store is on the first
host of ``PBS_NODEFILE`` unless ``MASTER_ADDR`` is set; neither is an error, never loopback.

Example:
    >>> info = PALS.detect({"PALS_RANKID": "3", "PMI_SIZE": "4", "PALS_LOCAL_RANKID": "1",
    ...                     "PALS_LOCAL_SIZE": "2", "PALS_NODEID": "1", "MASTER_ADDR": "n1",
    ...                     "PALS_APID": "abc"})
    >>> (info.launcher, info.node_rank, info.sources["node_rank"])
    ('pals', 1, 'PALS_NODEID')
"""

from __future__ import annotations

from collections.abc import Mapping

from devlayer.errors import LaunchEnvError
from devlayer.launchers.base import (
    BLOCK_PLACEMENT,
    DEFAULT_PORT,
    EnvReader,
    Launcher,
    ProcessInfo,
    distinct_hosts,
    job_port,
    local_world_from_nodes,
    num_nodes,
    read_hostfile,
    resolve_master,
)

__all__ = ["PALS"]

_JOB = ("PALS_APID", "PBS_JOBID")
_LOCAL_SIZE = ("PALS_LOCAL_SIZE", "PMI_LOCAL_SIZE", "MPI_LOCALNRANKS", "LOCAL_WORLD_SIZE")


def _detect(env: Mapping[str, str]) -> ProcessInfo | None:
    if "PALS_RANKID" not in env:
        return None
    r = EnvReader(env, "pals", _JOB)
    rank = r.int("rank", "PALS_RANKID")
    world = r.int("world_size", ("PALS_SIZE", "PMI_SIZE"))
    r.int("local_rank", ("PALS_LOCAL_RANKID", "PMI_LOCAL_RANK"), default=0 if world == 1 else None)
    hosts = read_hostfile(env, "PBS_NODEFILE")
    nodes_known = distinct_hosts(hosts) if hosts else []
    where = f"PBS_NODEFILE lists {len(nodes_known)} host(s)" if hosts else "no PBS_NODEFILE"
    local = local_world_from_nodes(r, _LOCAL_SIZE, world, len(nodes_known), where)
    nodes = r.put("num_nodes", num_nodes(world, local), "world_size / local_world_size")
    if nodes_known and nodes > len(nodes_known):
        raise LaunchEnvError(
            f"PALS job of {world} ranks at {local} per node needs {nodes} nodes but "
            f"PBS_NODEFILE lists {len(nodes_known)}; the job's variables disagree (a stale "
            f"export?): unset the wrong one"
        )
    if r.first(("PALS_NODEID",)) is not None:
        r.int("node_rank", "PALS_NODEID")
    else:
        r.put("node_rank", rank // local if local > 0 else 0, BLOCK_PLACEMENT)
    r.check_counts()
    addr, port = resolve_master(
        r,
        single_node=nodes == 1,
        world_size=world,
        fallback_port=lambda: job_port(env, _JOB) or (DEFAULT_PORT, "default"),
        multi_node_addr=nodes_known[0] if nodes_known else None,
        multi_node_addr_source="first host of PBS_NODEFILE",
    )
    return r.info(master_addr=addr, master_port=port)


PALS = Launcher(
    "pals",
    detect=_detect,
    prefixes=("PALS_", "PBS_"),
    job_id_vars=_JOB,
    family="mpi",
    rank_vars=("PALS_RANKID",),
    size_vars=("PALS_SIZE", "PMI_SIZE"),
)
