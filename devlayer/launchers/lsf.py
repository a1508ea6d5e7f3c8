"""LSF's ``jsrun`` (IBM Job Step Manager): ``JSM_NAMESPACE_*`` and ``LSB_*``.

``jsrun`` gives each task ``JSM_NAMESPACE_RANK``, ``JSM_NAMESPACE_SIZE``,
``JSM_NAMESPACE_LOCAL_RANK`` and ``JSM_NAMESPACE_LOCAL_SIZE``; LSF gives the job
``LSB_JOBID`` and its hosts (``LSB_MCPU_HOSTS`` = ``"host slots host slots ..."``,
``LSB_HOSTS`` = one name per slot, or the file ``LSB_DJOB_HOSTFILE``, one line per slot).
On CORAL machines (Summit, Sierra, Lassen) the first host of these lists is the launch
node, which runs no task: when the list holds one host more than the job's nodes, that
first host is skipped. Across nodes the store is on the first compute host unless
``MASTER_ADDR`` is set; a list that does not match the node count is an error, never a
guess. Ranks are placed in blocks of ``JSM_NAMESPACE_LOCAL_SIZE`` (jsrun's default packed
layout) unless ``NODE_RANK`` says otherwise.

Example:
    >>> info = LSF.detect({"JSM_NAMESPACE_RANK": "5", "JSM_NAMESPACE_SIZE": "8",
    ...                    "JSM_NAMESPACE_LOCAL_RANK": "1", "JSM_NAMESPACE_LOCAL_SIZE": "4",
    ...                    "LSB_JOBID": "77", "LSB_MCPU_HOSTS": "batch1 1 a01n01 42 a01n02 42"})
    >>> (info.launcher, info.node_rank, info.num_nodes, info.master_addr)
    ('lsf', 1, 2, 'a01n01')
"""

from __future__ import annotations

from collections.abc import Mapping

from devlayer.errors import LaunchEnvError
from devlayer.launchers.base import (
    BLOCK_PLACEMENT,
    EnvReader,
    Launcher,
    ProcessInfo,
    distinct_hosts,
    host_names,
    job_port,
    local_world_from_nodes,
    num_nodes,
    read_hostfile,
    resolve_master,
)

__all__ = ["LSF"]

_JOB = ("LSB_JOBID",)
_LOCAL_SIZE = ("JSM_NAMESPACE_LOCAL_SIZE", "LOCAL_WORLD_SIZE")
_HOST_VARS = ("LSB_MCPU_HOSTS", "LSB_HOSTS", "LSB_DJOB_HOSTFILE")


def job_hosts(env: Mapping[str, str]) -> tuple[list[str], str] | None:
    """``(distinct hosts in order, the variable they came from)``, or ``None`` when unset.

    Example:
        >>> job_hosts({"LSB_MCPU_HOSTS": "batch1 1 h1 42 h2 42"})
        (['batch1', 'h1', 'h2'], 'LSB_MCPU_HOSTS')
    """
    if env.get("LSB_MCPU_HOSTS", "").strip():
        return host_names(env["LSB_MCPU_HOSTS"])[::2], "LSB_MCPU_HOSTS"
    if env.get("LSB_HOSTS", "").strip():
        return distinct_hosts(host_names(env["LSB_HOSTS"])), "LSB_HOSTS"
    hosts = read_hostfile(env, "LSB_DJOB_HOSTFILE")
    return (distinct_hosts(hosts), "LSB_DJOB_HOSTFILE") if hosts else None


def _first_compute_host(env: Mapping[str, str], nodes: int) -> tuple[str | None, str]:
    """The first compute host of the job's host list (the launch node skipped), or why not."""
    found = job_hosts(env)
    if found is None:
        return None, ""
    hosts, var = found
    if len(hosts) == nodes + 1:  # CORAL: the launch node first, then the compute nodes
        return hosts[1], f"first compute host of {var} (after the launch node {hosts[0]})"
    if len(hosts) == nodes:
        return hosts[0], f"first host of {var}"
    raise LaunchEnvError(
        f"{var} lists {len(hosts)} host(s) for a job on {nodes} node(s), so devlayer cannot "
        f"tell which host runs rank 0; export MASTER_ADDR=<host of rank 0> for every rank"
    )


def _nodes(r: EnvReader, env: Mapping[str, str], world: int) -> int:
    """Nodes from the local size; without it, one node only when the host list says so."""
    if r.first(_LOCAL_SIZE) is None:
        found = job_hosts(env)
        where = (
            f"{found[1]} lists {len(found[0])} host(s)"
            if found
            else "none of " + ", ".join(_HOST_VARS) + " is set"
        )
        one = found is not None and len(found[0]) == 1
        local = local_world_from_nodes(r, _LOCAL_SIZE, world, 1 if one else 0, where)
    else:
        local = r.int("local_world_size", _LOCAL_SIZE)
    return r.put("num_nodes", num_nodes(world, local), "JSM_NAMESPACE_SIZE / local size")


def _detect(env: Mapping[str, str]) -> ProcessInfo | None:
    if "JSM_NAMESPACE_RANK" not in env:
        return None
    r = EnvReader(env, "lsf", job_vars=_JOB)
    rank = r.int("rank", "JSM_NAMESPACE_RANK")
    world = r.int("world_size", "JSM_NAMESPACE_SIZE")
    r.int("local_rank", "JSM_NAMESPACE_LOCAL_RANK")
    nodes = _nodes(r, env, world)
    local = r.values["local_world_size"]
    if r.first(("NODE_RANK",)) is not None:
        r.int("node_rank", "NODE_RANK")
    else:
        r.put("node_rank", rank // local if local > 0 else 0, BLOCK_PLACEMENT)
    r.check_counts()
    single = nodes == 1 or "MASTER_ADDR" in env
    addr, why = (None, "") if single else _first_compute_host(env, nodes)
    master, port = resolve_master(
        r,
        single_node=nodes == 1,
        world_size=world,
        fallback_port=lambda: job_port(env, _JOB),
        multi_node_addr=addr,
        multi_node_addr_source=why,
    )
    return r.info(master_addr=master, master_port=port)


LSF = Launcher(
    "lsf",
    detect=_detect,
    aliases=("jsrun",),
    prefixes=("JSM_", "LSB_"),
    job_id_vars=_JOB,
    family="mpi",  # Spectrum MPI's OMPI_* are set too: they must agree
)
