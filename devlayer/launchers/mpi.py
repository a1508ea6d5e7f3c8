"""The detector every MPI launcher shares, built from the names of its variables.

The MPI launchers (``openmpi``, ``mvapich``, ``pals``, ``mpich``, ``pmix``) name a rank, a
size, a local rank and a local size; each launcher module passes its names to
:func:`mpi_detector`. They come before SLURM in the precedence list because ``mpirun``
inside an allocation leaves SLURM's own (per-daemon) values in the environment.

Example:
    >>> detector = mpi_detector("openmpi", ("OMPI_COMM_WORLD_RANK",), ("OMPI_COMM_WORLD_SIZE",),
    ...                         ("OMPI_COMM_WORLD_LOCAL_RANK",), ("OMPI_COMM_WORLD_LOCAL_SIZE",))
    >>> info = detector({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4",
    ...                  "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
    ...                  "MASTER_ADDR": "n1", "MASTER_PORT": "29511"})
    >>> (info.launcher, info.rank, info.node_rank, info.num_nodes)
    ('openmpi', 3, 1, 2)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from devlayer.launchers.base import (
    BLOCK_PLACEMENT,
    DEFAULT_PORT,
    Detector,
    EnvReader,
    ProcessInfo,
    job_port,
    num_nodes,
    resolve_master,
)

__all__ = ["ASSUMED", "JobKey", "mpi_detector"]

#: The source of a local layout the launcher did not give: all ranks on one node. Only srun
#: (whose own layout then replaces it) or a single rank may keep it; see ``precedence``.
ASSUMED = "assumed single node"

#: ``(env, num_nodes) -> (port, why)`` for a launcher whose environment names no job.
JobKey = Callable[[Mapping[str, str], int], "tuple[int, str] | None"]


def mpi_detector(
    name: str,
    rank_vars: tuple[str, ...],
    size_vars: tuple[str, ...],
    local_rank_vars: tuple[str, ...],
    local_size_vars: tuple[str, ...],
    node_vars: tuple[str, ...] = (),
    job_vars: tuple[str, ...] = (),
    job_key: JobKey = lambda env, n: None,
) -> Detector:
    """Build a detector for an MPI-style launcher from its variable names.

    Without local ranks (nor an exported ``LOCAL_WORLD_SIZE``) all ranks are marked
    :data:`ASSUMED` on one node: :func:`~devlayer.launchers.detect` uses srun's layout when
    srun started them and refuses the job otherwise. The node rank follows block placement
    unless ``node_vars`` give it. ``job_key(env, num_nodes)`` is the port
    fallback for launchers whose environment names no job (tried after ``job_vars``,
    before the default port); it may refuse a job that spans several nodes, where a
    per-node value would give each node its own port.
    """

    def detector(env: Mapping[str, str]) -> ProcessInfo | None:
        if not any(v in env for v in rank_vars):
            return None
        r = EnvReader(env, name, job_vars)
        rank = r.int("rank", rank_vars)
        world = r.int("world_size", size_vars)
        local_rank = r.int("local_rank", local_rank_vars, default=-1)
        local_world = r.int("local_world_size", (*local_size_vars, "LOCAL_WORLD_SIZE"), default=-1)
        if local_rank < 0 and local_world > 0:  # a size without local ranks: blocks of it
            r.put("local_rank", rank % local_world, "rank % local_world_size")
        elif local_rank < 0 or local_world < 0:  # not said: precedence refuses it if > 1 rank
            r.put("local_rank", rank, ASSUMED)
            local_world = r.put("local_world_size", world, ASSUMED)
        nodes = r.put("num_nodes", num_nodes(world, local_world), "world_size / local_world_size")
        if node_vars and r.first(node_vars):
            r.int("node_rank", node_vars)
        else:
            r.put("node_rank", rank // local_world if local_world > 0 else 0, BLOCK_PLACEMENT)
        r.check_counts()
        addr, port = resolve_master(
            r,
            single_node=nodes == 1,
            world_size=world,
            fallback_port=lambda: (
                job_port(env, job_vars) or job_key(env, nodes) or (DEFAULT_PORT, "default")
            ),
        )
        return r.info(master_addr=addr, master_port=port)

    return detector
