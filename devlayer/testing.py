"""Helpers for testing code that uses devlayer on machines without accelerators.

Three things, all used by devlayer's own test suite:

* :class:`FakeRuntime` and :func:`simulate`: pretend a vendor (``cuda``, ``xpu``...) has N
  devices by replacing the backend's runtime, the single hardware seam. Nothing else is
  patched. The environment variable ``DEVLAYER_SIMULATE="cuda:4"`` does the same for
  subprocesses (CLI tests, launchers). Simulated devices cannot run kernels: use them to
  test selection, device mapping, visibility and error paths.
* Launcher environments (:func:`torchrun_env`, :func:`slurm_env`, :func:`openmpi_env`,
  :func:`intelmpi_env`): realistic variable sets for one rank.
* :func:`launcher_env`: a context manager that puts one of those environments (and nothing
  else from a launcher) into ``os.environ`` and restores it afterwards.
* :func:`run_ranks`: run a function on N real gloo ranks with a timeout.
* :func:`free_port`: a free loopback TCP port.

Example:
    >>> import devlayer
    >>> from devlayer.testing import simulate
    >>> with simulate("cuda", 4):
    ...     devlayer.backends.get_backend("cuda").device_count()
    4
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import devlayer.registry  # noqa: F401  (installs the vendor defaults that fake_for uses)
from devlayer import simulation
from devlayer.errors import InvalidArgumentError
from devlayer.launchers import PRECEDENCE, expand_nodelist, expand_tasks_per_node
from devlayer.net import free_port
from devlayer.simulation import FakeRuntime, fake_for, runtimes_from_spec

__all__ = [
    "LAUNCHER_PREFIXES",
    "LAUNCHER_VARIABLES",
    "FakeRuntime",
    "azureml_env",
    "deepspeed_env",
    "flux_env",
    "free_port",
    "reset_simulation",
    "intelmpi_env",
    "launcher_env",
    "lsf_env",
    "pals_env",
    "pytorchjob_env",
    "run_ranks",
    "openmpi_env",
    "runtimes_from_spec",
    "simulate",
    "slurm_env",
    "torchrun_env",
    "trainjob_env",
]


@contextlib.contextmanager
def simulate(
    vendor: str, device_count: int = 1, runtime: FakeRuntime | None = None, **kwargs: object
) -> Iterator[FakeRuntime]:
    """Pretend backend ``vendor`` has ``device_count`` devices inside the ``with`` block.

    A backend looked up inside the block (``init()``, ``get_backend``) is bound to the fake
    and keeps it; one looked up before the block keeps its real runtime.

    Args:
        vendor: A registered backend name (``cuda``, ``xpu``, a plugin...).
        device_count: How many devices to report.
        runtime: A ready-made fake instead of building one.
        **kwargs: Passed to :class:`FakeRuntime` (``comm=``, ``initialized=``, ``variant=``).

    Yields:
        The fake runtime, to inspect ``current`` and ``calls``.
    """
    fake = runtime if runtime is not None else fake_for(vendor, device_count, **kwargs)  # type: ignore[arg-type]
    previous = simulation.install(vendor, fake)
    try:
        yield fake
    finally:
        simulation.install(vendor, previous)


def reset_simulation() -> None:
    """Forget fakes made from ``DEVLAYER_SIMULATE`` (their recorded state included)."""
    simulation.reset()


# --------------------------------------------------------------------------- launcher envs


def torchrun_env(
    rank: int = 0,
    world_size: int = 2,
    *,
    local_world_size: int | None = None,
    master_addr: str = "127.0.0.1",
    master_port: int = 29500,
    restart_count: int = 0,
    max_restarts: int = 0,
    agent_store: bool = True,
) -> dict[str, str]:
    """The variables ``torchrun`` gives one worker.

    ``agent_store=False`` is what a worker gets with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``
    (as under ``devlayer launch``); ``max_restarts`` is torchrun's ``--max-restarts``.

    Less the comm libraries' own (torchrun also sets ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1``
    for NCCL): devlayer reads none of them, and vendor names live in ``backends/``.
    """
    lws = local_world_size or world_size
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank % lws),
        "LOCAL_WORLD_SIZE": str(lws),
        "GROUP_RANK": str(rank // lws),
        "GROUP_WORLD_SIZE": str(max(world_size // lws, 1)),
        "ROLE_RANK": str(rank),
        "ROLE_WORLD_SIZE": str(world_size),
        "ROLE_NAME": "default",
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        "TORCHELASTIC_RUN_ID": "none",
        "TORCHELASTIC_RESTART_COUNT": str(restart_count),
        "TORCHELASTIC_MAX_RESTARTS": str(max_restarts),
        "TORCHELASTIC_USE_AGENT_STORE": str(agent_store),
        "OMP_NUM_THREADS": "1",
    }


def slurm_env(
    rank: int = 0,
    world_size: int = 2,
    *,
    tasks_per_node: str | None = None,
    nodelist: str = "gpu-node[07-08]",
    job_id: int = 4242,
    step_id: int = 0,
    nodes: int | None = None,
    batch: bool = False,
) -> dict[str, str]:
    """The variables ``srun`` gives one task (``batch=True``: the sbatch shell instead)."""
    hosts = expand_nodelist(nodelist)
    nnodes = nodes or len(hosts)
    tpn = tasks_per_node or (
        f"{world_size // nnodes}(x{nnodes})" if world_size % nnodes == 0 else str(world_size)
    )
    counts = expand_tasks_per_node(tpn)
    node, start = 0, 0
    while node < len(counts) - 1 and rank >= start + counts[node]:
        start += counts[node]
        node += 1
    env = {
        "SLURM_JOB_ID": str(job_id),
        "SLURM_JOBID": str(job_id),
        "SLURM_JOB_NAME": "train",
        "SLURM_JOB_NODELIST": nodelist,
        "SLURM_NODELIST": nodelist,
        "SLURM_JOB_NUM_NODES": str(nnodes),
        "SLURM_NNODES": str(nnodes),
        "SLURM_NTASKS": str(world_size),
        "SLURM_NPROCS": str(world_size),
        "SLURM_TASKS_PER_NODE": tpn,
        "SLURM_SUBMIT_DIR": "/home/user/project",
        "SLURM_CPUS_ON_NODE": "32",
        "SLURM_PROCID": "0" if batch else str(rank),
        "SLURM_LOCALID": "0" if batch else str(rank - start),
        "SLURM_NODEID": "0" if batch else str(node),
        "SLURMD_NODENAME": hosts[0 if batch else node],
    }
    if not batch:
        env.update(
            {
                "SLURM_STEP_ID": str(step_id),
                "SLURM_STEPID": str(step_id),
                "SLURM_STEP_NUM_TASKS": str(world_size),
                "SLURM_STEP_NUM_NODES": str(nnodes),
                "SLURM_STEP_NODELIST": nodelist,
                "SLURM_STEP_TASKS_PER_NODE": tpn,
                "SLURM_SRUN_COMM_HOST": "10.0.0.1",
                "SLURM_SRUN_COMM_PORT": "40123",
                "SLURM_STEP_LAUNCHER_PORT": "40123",
            }
        )
    return env


def openmpi_env(
    rank: int = 0, world_size: int = 2, *, local_size: int | None = None
) -> dict[str, str]:
    """The variables OpenMPI's ``mpirun`` gives one rank."""
    ls = local_size or world_size
    return {
        "OMPI_COMM_WORLD_RANK": str(rank),
        "OMPI_COMM_WORLD_SIZE": str(world_size),
        "OMPI_COMM_WORLD_LOCAL_RANK": str(rank % ls),
        "OMPI_COMM_WORLD_LOCAL_SIZE": str(ls),
        "OMPI_COMM_WORLD_NODE_RANK": str(rank % ls),
        "OMPI_UNIVERSE_SIZE": str(world_size),
        "OMPI_MCA_ess_base_jobid": "3735879681",
        "PMIX_RANK": str(rank),
        "PMIX_NAMESPACE": "prterun-host-12345@1",
    }


def intelmpi_env(
    rank: int = 0, world_size: int = 2, *, local_size: int | None = None
) -> dict[str, str]:
    """The variables Intel MPI / MPICH (Hydra) give one rank."""
    ls = local_size or world_size
    return {
        "PMI_RANK": str(rank),
        "PMI_SIZE": str(world_size),
        "MPI_LOCALRANKID": str(rank % ls),
        "MPI_LOCALNRANKS": str(ls),
        "PMI_FD": "7",
        "I_MPI_HYDRA_TOPOLIB": "hwloc",
        "I_MPI_JOB_ID": "777",
    }


def _per_node(rank: int, world_size: int, local_size: int | None) -> tuple[int, int, int]:
    """``(local size, local rank, node rank)`` of block placement."""
    ls = local_size or world_size
    return ls, rank % ls, rank // ls


def lsf_env(rank: int = 0, world_size: int = 2, *, local_size: int | None = None) -> dict[str, str]:
    """The variables LSF's ``jsrun`` gives one task (CORAL: launch node first in the hosts)."""
    ls, local, _ = _per_node(rank, world_size, local_size)
    hosts = " ".join(f"h{n:02d} 42" for n in range(-(-world_size // ls)))
    return {
        "JSM_NAMESPACE_RANK": str(rank),
        "JSM_NAMESPACE_SIZE": str(world_size),
        "JSM_NAMESPACE_LOCAL_RANK": str(local),
        "JSM_NAMESPACE_LOCAL_SIZE": str(ls),
        "LSB_JOBID": "77",
        "LSB_MCPU_HOSTS": f"batch1 1 {hosts}",
    }


def flux_env(
    rank: int = 0, world_size: int = 2, *, local_size: int | None = None
) -> dict[str, str]:
    """The variables the Flux job shell gives one task (plus its PMI server's)."""
    ls, local, _ = _per_node(rank, world_size, local_size)
    env = {
        "FLUX_TASK_RANK": str(rank),
        "FLUX_TASK_LOCAL_ID": str(local),
        "FLUX_JOB_SIZE": str(world_size),
        "FLUX_JOB_NNODES": str(-(-world_size // ls)),
        "FLUX_JOB_ID": "f2xpcQE9K",
        "PMI_RANK": str(rank),
        "PMI_SIZE": str(world_size),
    }
    if ls < world_size:
        env["MASTER_ADDR"] = "node0"
    return env


def pals_env(
    rank: int = 0, world_size: int = 2, *, local_size: int | None = None
) -> dict[str, str]:
    """The variables PALS (Cray ``mpiexec`` under PBS) gives one rank."""
    ls, local, node = _per_node(rank, world_size, local_size)
    env = {
        "PALS_RANKID": str(rank),
        "PALS_LOCAL_RANKID": str(local),
        "PALS_NODEID": str(node),
        "PALS_APID": "abc-123",
        "PMI_RANK": str(rank),
        "PMI_SIZE": str(world_size),
        "PMI_LOCAL_RANK": str(local),
        "PMI_LOCAL_SIZE": str(ls),
        "PBS_JOBID": "123.pbs",
    }
    if ls < world_size:
        env["MASTER_ADDR"] = "x1000c0s0b0n0"
    return env


def pytorchjob_env(rank: int = 0, world_size: int = 2) -> dict[str, str]:
    """The variables Kubeflow's PyTorchJob (v1) gives one pod (one process per pod)."""
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "job-master-0",
        "MASTER_PORT": "23456",
        "PYTHONUNBUFFERED": "0",
        "KUBERNETES_SERVICE_HOST": "10.96.0.1",
    }


def trainjob_env(rank: int = 0, world_size: int = 2) -> dict[str, str]:
    """The variables Kubeflow Trainer v2 gives one node of one process."""
    return {
        "PET_NNODES": str(world_size),
        "PET_NPROC_PER_NODE": "1",
        "PET_NODE_RANK": str(rank),
        "PET_MASTER_ADDR": "job-node-0-0.job",
        "PET_MASTER_PORT": "29400",
        "KUBERNETES_SERVICE_HOST": "10.96.0.1",
    }


def deepspeed_env(
    rank: int = 0, world_size: int = 2, *, local_size: int | None = None
) -> dict[str, str]:
    """The variables DeepSpeed's launcher (``launch.py``, over pdsh) gives one process."""
    ls, local, node = _per_node(rank, world_size, local_size)
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(local),
        "WORLD_SIZE": str(world_size),
        "LOCAL_SIZE": str(ls),
        "CROSS_RANK": str(node),
        "CROSS_SIZE": str(-(-world_size // ls)),
        "MASTER_ADDR": "worker-0",
        "MASTER_PORT": "29500",
    }


def azureml_env(
    rank: int = 0, world_size: int = 2, *, local_size: int | None = None
) -> dict[str, str]:
    """The variables an AzureML MPI job gives one rank (OpenMPI's and AzureML's)."""
    env = openmpi_env(rank, world_size, local_size=local_size)
    env.update({"AZ_BATCH_MASTER_NODE": "10.0.0.4:6105", "AZUREML_RUN_ID": "run_42"})
    return env


_LAUNCHER_ENVS = {
    "torchrun": torchrun_env,
    "slurm": slurm_env,
    "openmpi": openmpi_env,
    "intelmpi": intelmpi_env,
    "lsf": lsf_env,
    "flux": flux_env,
    "pals": pals_env,
    "pytorchjob": pytorchjob_env,
    "trainjob": trainjob_env,
    "deepspeed": deepspeed_env,
    "azureml": azureml_env,
}
#: Prefixes and names of the variables launchers set (hidden by :func:`launcher_env`), from
#: the records of :data:`devlayer.launchers.PRECEDENCE`: a new launcher's are hidden too.
LAUNCHER_PREFIXES = tuple(dict.fromkeys(p for rec in PRECEDENCE for p in rec.prefixes))
LAUNCHER_VARIABLES = tuple(dict.fromkeys(v for rec in PRECEDENCE for v in rec.variables))


@contextlib.contextmanager
def launcher_env(
    kind: str, rank: int = 0, world_size: int = 2, **kwargs: object
) -> Iterator[dict[str, str]]:
    """Pretend this process was started by ``kind`` (``torchrun``, ``slurm``, ``openmpi``,
    ``intelmpi``, ``lsf``, ``flux``, ``pals``, ``pytorchjob``, ``trainjob``, ``deepspeed``,
    ``azureml``) as ``rank`` of ``world_size``; other launcher variables are hidden.

    Example:
        >>> import devlayer.launchers as launchers, os
        >>> with launcher_env("slurm", 1, 4, nodelist="n[1-2]"):
        ...     launchers.detect(os.environ).local_rank
        1
    """

    if kind not in _LAUNCHER_ENVS:
        raise InvalidArgumentError(
            f"launcher_env({kind!r}): use one of {', '.join(sorted(_LAUNCHER_ENVS))}"
        )
    values = _LAUNCHER_ENVS[kind](rank, world_size, **kwargs)  # type: ignore[operator]
    saved = dict(os.environ)
    for key in list(os.environ):
        if key.startswith(LAUNCHER_PREFIXES) or key in LAUNCHER_VARIABLES:
            del os.environ[key]
    os.environ.update(values)
    try:
        yield values
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run_ranks(
    fn: Callable[..., Any], nprocs: int = 2, *args: object, timeout: float = 120.0
) -> list[Any]:
    """Run ``fn(*args)`` on ``nprocs`` real CPU ranks (gloo); results in rank order.

    A thin wrapper over :func:`devlayer.spawn` for tests: backend ``cpu``, collective
    timeout and whole-run limit both bounded by ``timeout`` so a broken test fails instead
    of hanging. ``fn`` must be importable (defined at module level).
    """
    from devlayer.multiproc import spawn

    return spawn(
        fn,
        nprocs,
        args,
        backend="cpu",
        timeout=timeout,
        join_timeout=timeout + 30,
    )
