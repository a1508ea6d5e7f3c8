"""SLURM ``srun`` steps. The batch shell of ``sbatch``/``salloc`` is *not* a multi-rank job.

The store host is the first node of the step's node list and the port is derived from the
job and step ids (:func:`~devlayer.launchers.base.derived_port`), so every rank finds them
without an exported ``MASTER_ADDR``/``MASTER_PORT``. ``SLURM_CPUS_PER_TASK`` gives
``ProcessInfo.cpus_per_rank``: srun makes each rank a task with CPUs of its own.

Example:
    >>> info = SLURM.detect({"SLURM_JOB_ID": "42", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1",
    ...                      "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "1",
    ...                      "SLURM_STEP_NODELIST": "gpu-node07", "SLURM_CPUS_PER_TASK": "8"})
    >>> (info.rank, info.local_world_size, info.master_port, info.cpus_per_rank)
    (1, 2, 15672, 8)
"""

from __future__ import annotations

from collections.abc import Mapping

from devlayer.errors import LaunchEnvError
from devlayer.launchers.base import (
    BLOCK_PLACEMENT,
    EnvReader,
    Launcher,
    ProcessInfo,
    derived_port,
    expand_nodelist,
    expand_tasks_per_node,
    local_world_from_nodes,
    num_nodes,
    number_or_hash,
    resolve_master,
)

__all__ = ["SLURM", "expand_nodelist", "expand_tasks_per_node", "is_srun_step"]

_JOB = ("SLURM_JOB_ID", "SLURM_JOBID")
_STEP = ("SLURM_STEP_ID", "SLURM_STEPID")
# srun sets SLURM_NNODES and SLURM_NODELIST to the step's; SLURM_JOB_* are the allocation's.
_NODES = ("SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
_NODELIST = ("SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_JOB_NODELIST")

# Slurm step ids that are not srun steps: the batch script, the extern step and the
# interactive step of salloc. Numeric forms from slurm.h: since 20.11 batch = 0xfffffffb,
# interactive = 0xfffffffa, extern = 0xfffffffc, pending = 0xfffffffd; before 20.11
# batch = 0xfffffffe, extern = 0xffffffff.
_NON_SRUN_STEPS = {"batch", "extern", "interactive", "pending"} | {
    str(n) for n in range(4294967290, 4294967296)
}
_SRUN_MARKERS = ("SLURM_STEP_NUM_TASKS", "SLURM_SRUN_COMM_PORT", "SLURM_STEP_LAUNCHER_PORT")


def is_srun_step(env: Mapping[str, str]) -> bool:
    """True inside an srun step, False in the batch shell, extern or interactive step.

    Example:
        >>> is_srun_step({"SLURM_STEP_ID": "0"}), is_srun_step({"SLURM_STEP_ID": "batch"})
        (True, False)
    """
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
    if step is not None and step.strip().lower() in _NON_SRUN_STEPS:
        return False
    return any(m in env for m in _SRUN_MARKERS) or step is not None


def _nodes_var(r: EnvReader) -> int | None:
    """The step's node count when srun exported it, else ``None``."""
    if r.first(_NODES) is None:
        return None
    return r.int("num_nodes", _NODES)


def _cross_check(r: EnvReader, derived: int, why: str, nodes: int | None) -> int:
    """``derived`` nodes, which must equal the node count srun exported, if any."""
    if nodes is not None and nodes != derived:
        raise LaunchEnvError(
            f"{r.sources['num_nodes']}={nodes} but {why} gives {derived} node(s); the job's "
            f"variables disagree (a stale export?): unset the wrong one"
        )
    if nodes is None:
        r.put("num_nodes", derived, why)
    return derived


def _node_rank(r: EnvReader, derived: int, why: str, nodes: int, listing: str) -> int:
    """``SLURM_NODEID`` when set (checked against ``nodes``), else ``derived``."""
    if r.first(("SLURM_NODEID",)) is None:
        return r.put("node_rank", derived, why)
    node = r.int("node_rank", "SLURM_NODEID")
    if not 0 <= node < nodes:
        raise LaunchEnvError(
            f"SLURM_NODEID={node} but {listing} lists only {nodes} node(s); node ids run "
            f"from 0 to {nodes - 1}"
        )
    return node


def _layout_from_counts(r: EnvReader, var: str, spec: str, world: int) -> None:
    """Node count, node rank and local world from a tasks-per-node list such as ``2(x3),1``."""
    counts = expand_tasks_per_node(spec)
    if sum(counts) != world:
        raise LaunchEnvError(
            f"{var}={spec!r} places {sum(counts)} tasks but {r.sources['world_size']}={world}; "
            f"the job's variables disagree (a stale export?): unset the wrong one"
        )
    _cross_check(r, len(counts), f"{var}={spec!r}", _nodes_var(r))
    rank = r.values["rank"]
    block = next((i for i in range(len(counts)) if rank < sum(counts[: i + 1])), 0)
    why = f"rank {rank} in {var} (block placement)"
    node = _node_rank(r, block, why, len(counts), f"{var}={spec!r}")
    r.put("local_world_size", counts[node], f"{var}[{node}]")


def _layout_from_per_node(r: EnvReader, world: int) -> None:
    """The layout from ``SLURM_NTASKS_PER_NODE`` (``--ntasks-per-node``), block placement."""
    per_node = r.int("local_world_size", "SLURM_NTASKS_PER_NODE")
    if per_node < 1:
        raise LaunchEnvError(f"SLURM_NTASKS_PER_NODE={per_node} is not a task count; use >= 1")
    why = f"{r.sources['world_size']}={world} / SLURM_NTASKS_PER_NODE={per_node}"
    nodes = _cross_check(r, num_nodes(world, per_node), why, _nodes_var(r))
    node = _node_rank(r, r.values["rank"] // per_node, BLOCK_PLACEMENT, nodes, why)
    if node == nodes - 1 and world % per_node:  # the last node holds the rest
        r.put("local_world_size", world % per_node, f"{why}: the rest on the last node")


def _layout(r: EnvReader, world: int) -> int:
    """Node count, node rank and local world: read, derived or cross-checked, never assumed.

    Returns:
        The number of nodes.
    """
    listed = r.first(("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"))
    if listed is not None:
        _layout_from_counts(r, listed[0], listed[1], world)
    elif r.first(("SLURM_NTASKS_PER_NODE",)) is not None:
        _layout_from_per_node(r, world)
    else:
        nodes = _nodes_var(r)
        if nodes is None:
            hosts = r.first(_NODELIST)
            if hosts is None:
                raise LaunchEnvError(
                    f"srun step of {world} tasks without SLURM_NNODES, SLURM_NODELIST or a "
                    f"tasks-per-node value: devlayer cannot tell how many nodes it spans; "
                    f"export SLURM_NNODES=<nodes> or start the step with srun itself"
                )
            nodes = _cross_check(r, len(expand_nodelist(hosts[1])), hosts[0], None)
        where = f"{r.sources['num_nodes']}={nodes}"
        local_world_from_nodes(r, ("SLURM_NTASKS_PER_NODE",), world, nodes, where)
        _node_rank(r, 0, f"{where}: the one node", nodes, where)
    return r.values["num_nodes"]


def _cpus_per_rank(r: EnvReader) -> None:
    """Read ``SLURM_CPUS_PER_TASK`` (srun's ``--cpus-per-task``) when set; < 1 is an error."""
    if r.first(("SLURM_CPUS_PER_TASK",)) is None:
        return
    cpus = r.int("cpus_per_rank", "SLURM_CPUS_PER_TASK")
    if cpus < 1:
        raise LaunchEnvError(
            f"SLURM_CPUS_PER_TASK={cpus} is not a CPU count; it must be >= 1 (check "
            f"--cpus-per-task in the job script)"
        )


def _detect(env: Mapping[str, str]) -> ProcessInfo | None:
    if "SLURM_PROCID" not in env or not is_srun_step(env):
        return None
    r = EnvReader(env, "slurm", _JOB, _STEP)
    r.int("rank", "SLURM_PROCID")
    world = r.int("world_size", ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"))
    r.int("local_rank", "SLURM_LOCALID")
    nodes = _layout(r, world)
    r.check_counts()
    _cpus_per_rank(r)
    nodelist = r.first(_NODELIST)
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", "0"))
    job = env.get("SLURM_JOB_ID", env.get("SLURM_JOBID"))

    def job_port() -> tuple[int, str] | None:
        if not job:
            return None
        port = derived_port(number_or_hash(job), number_or_hash(step))
        return port, f"derived from SLURM_JOB_ID={job}, SLURM_STEP_ID={step}"

    addr, port = resolve_master(
        r,
        single_node=nodes == 1,
        world_size=world,
        fallback_port=job_port,
        multi_node_addr=expand_nodelist(nodelist[1])[0] if nodelist else None,
        multi_node_addr_source=f"first node of {nodelist[0]}" if nodelist else "",
    )
    return r.info(master_addr=addr, master_port=port)


SLURM = Launcher("slurm", _detect, aliases=("srun",), prefixes=("SLURM_",), job_id_vars=_JOB)
