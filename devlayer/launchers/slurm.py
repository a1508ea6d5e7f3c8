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
    EnvReader,
    Launcher,
    ProcessInfo,
    derived_port,
    number_or_hash,
    resolve_master,
)

__all__ = ["SLURM", "expand_nodelist", "expand_tasks_per_node", "is_srun_step"]

_JOB = ("SLURM_JOB_ID", "SLURM_JOBID")
_STEP = ("SLURM_STEP_ID", "SLURM_STEPID")

# Slurm step ids that are not srun steps: the batch script, the extern step and the
# interactive step of salloc. Numeric forms from slurm.h: since 20.11 batch = 0xfffffffb,
# interactive = 0xfffffffa, extern = 0xfffffffc, pending = 0xfffffffd; before 20.11
# batch = 0xfffffffe, extern = 0xffffffff.
_NON_SRUN_STEPS = {"batch", "extern", "interactive", "pending"} | {
    str(n) for n in range(4294967290, 4294967296)
}
_SRUN_MARKERS = ("SLURM_STEP_NUM_TASKS", "SLURM_SRUN_COMM_PORT", "SLURM_STEP_LAUNCHER_PORT")


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM node list such as ``gpu-node[07-09,12],cpu[1-2]``.

    Uses the ``python-hostlist`` package, which handles zero padding, several bracket
    groups per name and several names.

    Example:
        >>> expand_nodelist("gpu-node[07-08],login1")
        ['gpu-node07', 'gpu-node08', 'login1']
    """
    import hostlist  # python-hostlist; small and pure Python

    try:
        hosts: list[str] = hostlist.expand_hostlist(nodelist)
    except hostlist.BadHostlist as exc:
        raise LaunchEnvError(
            f"cannot expand the SLURM node list {nodelist!r}: {exc}; expected a form like "
            f"'node[01-04,07]'"
        ) from None
    return hosts


def expand_tasks_per_node(spec: str) -> list[int]:
    """Expand ``SLURM_TASKS_PER_NODE`` such as ``2(x3),1`` to ``[2, 2, 2, 1]``.

    Example:
        >>> expand_tasks_per_node("2(x3),1")
        [2, 2, 2, 1]
    """
    counts: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if "(x" in part:
                value, _, times = part.partition("(x")
                counts.extend([int(value)] * int(times.rstrip(")")))
            else:
                counts.append(int(part))
        except ValueError:
            raise LaunchEnvError(
                f"cannot read the SLURM tasks-per-node value {spec!r}; expected a form like "
                f"'2(x3),1'"
            ) from None
    return counts


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


def _local_world_size(r: EnvReader, world: int, node_rank: int) -> None:
    """This node's task count from the step's tasks-per-node list, else the per-node value."""
    per_node_var = r.first(("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"))
    if per_node_var is None:
        r.int("local_world_size", "SLURM_NTASKS_PER_NODE", default=world)
        return
    counts = expand_tasks_per_node(per_node_var[1])
    if node_rank >= len(counts):
        raise LaunchEnvError(
            f"SLURM_NODEID={node_rank} but {per_node_var[0]}={per_node_var[1]!r} lists "
            f"only {len(counts)} node(s)"
        )
    r.put("local_world_size", counts[node_rank], f"{per_node_var[0]}[{node_rank}]")


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
    node_rank = r.int("node_rank", "SLURM_NODEID", default=0)
    nodes = r.int(
        "num_nodes", ("SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES"), default=1
    )
    _local_world_size(r, world, node_rank)
    r.check_counts()
    _cpus_per_rank(r)
    nodelist = r.first(("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"))
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


SLURM = Launcher(
    "slurm",
    detect=_detect,
    aliases=("srun",),
    prefixes=("SLURM_",),
    job_id_vars=_JOB,
)
