"""AzureML's MPI distribution: OpenMPI's ranks and ``AZ_BATCH_MASTER_NODE``.

An AzureML command job with ``distribution: mpi`` starts the ranks with OpenMPI
(``OMPI_COMM_WORLD_*``) and gives them the rank-0 node as ``AZ_BATCH_MASTER_NODE``
(``host:port``) across nodes, or ``AZ_BATCHAI_MPI_MASTER_NODE`` (a host) on one node, not
``MASTER_ADDR``. These are read as DeepSpeed's ``patch_aml_env_for_torch_nccl_backend``
reads them: an exported ``MASTER_ADDR``/``MASTER_PORT`` still wins; the port of
``AZ_BATCH_MASTER_NODE`` is used, else the job's derived port.

Example:
    >>> info = AZUREML.detect({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8",
    ...                        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    ...                        "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
    ...                        "AZ_BATCH_MASTER_NODE": "10.0.0.4:6105"})
    >>> (info.launcher, info.node_rank, info.master_addr, info.master_port)
    ('azureml', 1, '10.0.0.4', 6105)
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
    job_port,
    num_nodes,
    resolve_master,
)

__all__ = ["AZUREML"]

_JOB = ("AZUREML_RUN_ID", "OMPI_MCA_ess_base_jobid")
_MASTER = ("AZ_BATCH_MASTER_NODE", "AZ_BATCHAI_MPI_MASTER_NODE")


def _master_node(env: Mapping[str, str]) -> tuple[str, int | None, str] | None:
    """``(host, port or None, variable)`` of the first of :data:`_MASTER` set."""
    for name in _MASTER:
        raw = env.get(name, "").strip()
        if not raw:
            continue
        host, _, port = raw.rpartition(":") if ":" in raw else (raw, "", "")
        if port and not port.isdigit():
            raise LaunchEnvError(
                f"{name}={raw!r} is not host:port; expected e.g. 10.0.0.4:6105 (or export "
                f"MASTER_ADDR and MASTER_PORT)"
            )
        return host, int(port) if port else None, name
    return None


def _detect(env: Mapping[str, str]) -> ProcessInfo | None:
    found = _master_node(env)
    if "OMPI_COMM_WORLD_RANK" not in env or found is None:
        return None
    host, node_port, var = found
    r = EnvReader(env, "azureml", _JOB)
    rank = r.int("rank", "OMPI_COMM_WORLD_RANK")
    world = r.int("world_size", "OMPI_COMM_WORLD_SIZE")
    r.int("local_rank", "OMPI_COMM_WORLD_LOCAL_RANK")
    local = r.int("local_world_size", "OMPI_COMM_WORLD_LOCAL_SIZE")
    r.put("num_nodes", num_nodes(world, local), "world_size / local_world_size")
    r.put("node_rank", rank // local if local > 0 else 0, BLOCK_PLACEMENT)
    r.check_counts()

    def port() -> tuple[int, str]:
        if node_port is not None:
            return node_port, f"port of {var}"
        return job_port(env, _JOB) or (DEFAULT_PORT, "default")

    addr, master_port = resolve_master(
        r,
        single_node=False,  # the master node AzureML names, even on one node
        world_size=world,
        fallback_port=port,
        multi_node_addr=host,
        multi_node_addr_source=f"host of {var}",
    )
    return r.info(master_addr=addr, master_port=master_port)


AZUREML = Launcher(
    "azureml",
    detect=_detect,
    aliases=("aml",),
    prefixes=("AZ_BATCH",),
    variables=("AZUREML_RUN_ID",),
    job_id_vars=_JOB,
    family="mpi",
)
