"""Read the launcher's environment: who am I, how many are we, where do we meet.

Everything here is a pure function of an environment mapping, so it is tested with plain
dicts and never touches the process. One exception, read only when :func:`detect` is given
this process's own ``os.environ``: MPICH's Hydra exports no job id, so a single-node
MPICH job keys its port on the ``hydra_pmi_proxy`` process that started all its local
ranks. :func:`detect` returns a frozen :class:`ProcessInfo` whose ``sources`` say which
variable gave each value.

The package: :mod:`~devlayer.launchers.base` (``ProcessInfo``, the :class:`Launcher`
record, :class:`EnvReader`, validation, the port rules), one module per launcher
(``torchrun``, ``ray``, ``pytorchjob``, ``deepspeed``, ``env``, ``azureml``, ``lsf``, ``flux``,
``openmpi``, ``mvapich``, ``pals``, ``mpich``, ``pmix``, ``slurm``, ``trainjob``), each
exporting one record, ``mpi`` (the detector the MPI launchers share) and
:mod:`~devlayer.launchers.precedence` (the :data:`PRECEDENCE` list and :func:`detect`).

Precedence (first match wins):

1. ``DEVLAYER_LAUNCHER=<name>`` forces one detector (``none`` forces a single process).
2. ``torchrun`` / torchelastic (``TORCHELASTIC_RUN_ID`` or ``GROUP_RANK`` with ``RANK``);
   named ``accelerate`` when ``accelerate launch`` started torchrun. Then Ray Train's
   workers (torchrun's names with ``RAY_RAYLET_PID``/``RAY_JOB_ID``), Kubeflow's
   PyTorchJob pods (``RANK`` without ``LOCAL_RANK`` in a pod: each pod a node) and
   DeepSpeed's launcher (``RANK`` with ``CROSS_RANK``/``LOCAL_SIZE``).
3. ``env``: ``RANK`` and ``WORLD_SIZE`` exported by hand or by :func:`devlayer.spawn`.
   If a scheduler or MPI detector below also matches and disagrees, that is an error.
4. AzureML, LSF ``jsrun`` and Flux, then the MPI families: OpenMPI, MVAPICH, PALS (PBS),
   MPICH / Intel MPI (PMI), PMIx. MPI ranks without local ranks are an error unless srun
   started them.
   They come before SLURM because ``mpirun`` inside an allocation leaves SLURM's own
   (per-daemon) values in the environment. When srun itself started the ranks
   (``srun --mpi=pmi2`` / ``pmix`` give a rank but no local ranks) and the srun step agrees
   on rank and size, SLURM's per-node layout is used.
5. SLURM ``srun`` steps. The batch shell of ``sbatch``/``salloc`` is *not* a multi-rank job.
6. Kubeflow Trainer v2's ``PET_*`` without torchrun (one process per node).
7. A single process; a partial set (``RANK``, ``LOCAL_RANK`` or ``GROUP_RANK`` alone,
   ``WORLD_SIZE`` > 1 without ``RANK``) is an error. docs/launchers.md lists every engine.

Example:
    >>> info = detect({"SLURM_JOB_ID": "42", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1",
    ...                "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "1", "SLURM_NODEID": "0",
    ...                "SLURM_STEP_NODELIST": "gpu-node07", "SLURM_STEP_TASKS_PER_NODE": "2"})
    >>> (info.launcher, info.rank, info.world_size, info.local_rank, info.master_port)
    ('slurm', 1, 2, 1, 15672)
    >>> derived_port(42, 0)
    15672
    >>> expand_tasks_per_node("2(x2)")
    [2, 2]
    >>> launched({})
    False
"""

from devlayer.launchers.base import (
    DEFAULT_PORT,
    EnvReader,
    Launcher,
    ProcessInfo,
    derived_port,
)
from devlayer.launchers.precedence import LAUNCHERS, PRECEDENCE, detect, launched
from devlayer.launchers.slurm import expand_nodelist, expand_tasks_per_node
from devlayer.launchers.trainjob import torchrun_arguments

__all__ = [
    "DEFAULT_PORT",
    "LAUNCHERS",
    "PRECEDENCE",
    "EnvReader",
    "Launcher",
    "ProcessInfo",
    "derived_port",
    "detect",
    "expand_nodelist",
    "expand_tasks_per_node",
    "launched",
    "torchrun_arguments",
]
