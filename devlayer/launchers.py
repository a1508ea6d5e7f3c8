"""Read the launcher's environment: who am I, how many are we, where do we meet.

Everything here is a pure function of an environment mapping, so it is tested with plain
dicts and never touches the process. One exception, read only when :func:`detect` is given
this process's own ``os.environ``: MPICH's Hydra exports no job id, so a single-node
MPICH job keys its port on the ``hydra_pmi_proxy`` process that started all its local
ranks. :func:`detect` returns a frozen :class:`ProcessInfo` whose ``sources`` say which
variable gave each value.

Precedence (first match wins):

1. ``DEVLAYER_LAUNCHER=<name>`` forces one detector (``none`` forces a single process).
2. ``torchrun`` / torchelastic (``TORCHELASTIC_RUN_ID`` or ``GROUP_RANK`` with ``RANK``);
   named ``accelerate`` when ``accelerate launch`` started torchrun.
3. ``env``: ``RANK`` and ``WORLD_SIZE`` exported by hand or by :func:`devlayer.spawn`.
   If a scheduler or MPI detector below also matches and disagrees, that is an error.
4. MPI families: OpenMPI, MVAPICH, PALS, MPICH / Intel MPI (PMI), PMIx.
   They come before SLURM because ``mpirun`` inside an allocation leaves SLURM's own
   (per-daemon) values in the environment. When srun itself started the ranks
   (``srun --mpi=pmi2`` / ``pmix`` give a rank but no local ranks) and the srun step agrees
   on rank and size, SLURM's per-node layout is used.
5. SLURM ``srun`` steps. The batch shell of ``sbatch``/``salloc`` is *not* a multi-rank job.
6. A single process.

Example:
    >>> info = detect({"SLURM_JOB_ID": "42", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1",
    ...                "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "1", "SLURM_NODEID": "0",
    ...                "SLURM_STEP_NODELIST": "gpu-node07", "SLURM_STEP_TASKS_PER_NODE": "2"})
    >>> (info.launcher, info.rank, info.world_size, info.local_rank, info.master_port)
    ('slurm', 1, 2, 1, 15672)
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from devlayer.errors import LaunchEnvError

__all__ = [
    "LAUNCHERS",
    "ProcessInfo",
    "derived_port",
    "detect",
    "expand_nodelist",
    "expand_tasks_per_node",
    "launched",
]

LOOPBACK = "127.0.0.1"
DEFAULT_PORT = 29500
SLURM_PORT_BASE = 15000
SLURM_PORT_SPAN = 20000
#: Ports per job in the derived-port rule: steps 0..15 of one job get ports of their own.
PORT_STEP_SLOTS = 16


@dataclass(frozen=True)
class ProcessInfo:
    """Where this process stands in the job, as the launcher described it.

    Attributes:
        rank: Global rank, ``0 <= rank < world_size``.
        world_size: Number of processes in the job.
        local_rank: Rank among the processes on this node.
        local_world_size: Number of processes on this node.
        node_rank: Index of this node.
        num_nodes: Number of nodes.
        master_addr: Host of the rendezvous store.
        master_port: Port of the rendezvous store (``None`` for a single process).
        launcher: Name of the detector that matched (``none`` for a single process).
        restart_count: How often an elastic agent restarted the job (torchrun).
        sources: Which environment variable (or rule) gave each field.
        notes: Remarks for ``devlayer info`` (e.g. "sbatch shell without srun").
        job_id: The launcher's or scheduler's job id as ``VARIABLE=value``
            (``SLURM_JOB_ID=42``), or ``None``; also set for the one process of an
            ``sbatch`` shell. For logs, lock files and :attr:`job_identity`.
        job_step: The step of the job as ``VARIABLE=value`` (``SLURM_STEP_ID=1``) when the
            launcher is a scheduler whose steps are separate worlds (``srun``), else ``None``.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str = LOOPBACK
    master_port: int | None = None
    launcher: str = "none"
    restart_count: int = 0
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)
    notes: tuple[str, ...] = field(default=(), compare=False)
    job_id: str | None = field(default=None, compare=False)
    job_step: str | None = field(default=None, compare=False)

    @property
    def is_distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def job_identity(self) -> str:
        """Launcher, job id and step: the same on every rank of one job, and only of that job.

        The rendezvous refuses a rank whose identity differs from the store host's, so ranks
        of two jobs that meet on one port never form one world.

        Example:
            >>> ProcessInfo(launcher="slurm", job_id="SLURM_JOB_ID=42",
            ...             job_step="SLURM_STEP_ID=1").job_identity
            'slurm job SLURM_JOB_ID=42 step SLURM_STEP_ID=1'
            >>> ProcessInfo(launcher="env").job_identity
            'env job (no job id)'
        """
        text = f"{self.launcher} job {self.job_id or '(no job id)'}"
        return f"{text} step {self.job_step}" if self.job_step else text

    def torch_env(self) -> dict[str, str]:
        """The torchrun-style variables that describe this process (for children and peers)."""
        env = {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "MASTER_ADDR": self.master_addr,
        }
        if self.master_port is not None:
            env["MASTER_PORT"] = str(self.master_port)
        return env


# --------------------------------------------------------------------------- helpers


#: Job-id variables, most specific first, for launchers whose detector names none.
_JOB_ID_VARS = ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID")


class _Reader:
    """Reads one launcher's variables, records each field's value and source, builds the result.

    Every detector reads its fields through ``int`` (or sets derived ones with ``put``) and
    ends with :meth:`info`: the one place a :class:`ProcessInfo` is made.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        launcher: str,
        job_vars: Iterable[str] = (),
        step_vars: Iterable[str] = (),
    ) -> None:
        self.env = env
        self.launcher = launcher
        self.job_vars = (*job_vars, *_JOB_ID_VARS)
        self.step_vars = tuple(step_vars)
        self.sources: dict[str, str] = {}
        self.values: dict[str, int] = {}

    def put(self, fieldname: str, value: int, source: str | None = None) -> int:
        """Record a field that no variable gave directly (a rule or an assumption)."""
        self.values[fieldname] = value
        if source is not None:
            self.sources[fieldname] = source
        return value

    def info(self, **fields: Any) -> ProcessInfo:
        """The :class:`ProcessInfo` of the fields read so far, plus ``fields``."""
        return ProcessInfo(
            **{**self.values, **fields},
            launcher=self.launcher,
            sources=self.sources,
            job_id=self._named(self.job_vars),
            job_step=self._named(self.step_vars),
        )

    def _named(self, names: Iterable[str]) -> str | None:
        """``VARIABLE=value`` of the first of ``names`` set (``none``: torchrun's unset id)."""
        for name in names:
            value = self.env.get(name, "").strip()
            if value and value != "none":
                return f"{name}={value}"
        return None

    def check_counts(self) -> None:
        """Report bad rank/size values before MASTER_ADDR/MASTER_PORT errors can hide them."""
        _validate(self.info())

    def first(self, names: Iterable[str]) -> tuple[str, str] | None:
        for name in names:
            value = self.env.get(name)
            if value is not None and value.strip() != "":
                return name, value.strip()
        return None

    def int(self, fieldname: str, names: Iterable[str] | str, default: int | None = None) -> int:
        names = (names,) if isinstance(names, str) else tuple(names)
        found = self.first(names)
        if found is None:
            if default is None:
                raise LaunchEnvError(
                    f"{self.launcher} launch: none of {', '.join(names)} is set, so devlayer "
                    f"cannot tell the {fieldname}; export {names[0]} or start the job with the "
                    f"launcher's own command (torchrun, srun, mpirun)"
                )
            self.sources.setdefault(fieldname, "default")
            self.values[fieldname] = default
            return default
        name, raw = found
        try:
            value = int(raw)
        except ValueError:
            raise LaunchEnvError(
                f"{name}={raw!r} is not an integer; the {fieldname} must be a whole number "
                f"(check what sets {name} in your job script)"
            ) from None
        self.sources[fieldname] = name
        self.values[fieldname] = value
        return value

    def str(self, fieldname: str, names: Iterable[str] | str) -> str | None:
        names = (names,) if isinstance(names, str) else tuple(names)
        found = self.first(names)
        if found is None:
            return None
        self.sources[fieldname] = found[0]
        return found[1]


def _port(reader: _Reader, names: Iterable[str] = ("MASTER_PORT",)) -> int | None:
    found = reader.first(names)
    if found is None:
        return None
    name, raw = found
    try:
        port = int(raw)
    except ValueError:
        raise LaunchEnvError(f"{name}={raw!r} is not a port number; use 1..65535") from None
    if not 0 < port < 65536:
        raise LaunchEnvError(f"{name}={port} is out of range; use a port in 1..65535")
    reader.sources["master_port"] = name
    return port


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


def _num_nodes(world: int, local_world: int) -> int:
    """Nodes needed for ``world`` ranks at ``local_world`` per node (rounded up).

    Never divides by zero: a size < 1 is reported by :func:`_validate` with the variable's
    name instead of a ZeroDivisionError.
    """
    if local_world < 1 or world < 1:
        return 1
    return max(-(-world // local_world), 1)


def _validate(info: ProcessInfo) -> ProcessInfo:
    src = info.sources

    def where(fieldname: str) -> str:
        return src.get(fieldname, fieldname)

    if info.world_size < 1:
        raise LaunchEnvError(
            f"{where('world_size')}={info.world_size} is not a valid world size; it must be >= 1"
        )
    if not 0 <= info.rank < info.world_size:
        raise LaunchEnvError(
            f"{where('rank')}={info.rank} is out of range for "
            f"{where('world_size')}={info.world_size}; ranks run from 0 to {info.world_size - 1}"
        )
    if info.local_world_size < 1 or info.local_world_size > info.world_size:
        raise LaunchEnvError(
            f"{where('local_world_size')}={info.local_world_size} is not in 1..{info.world_size} "
            f"({where('world_size')}={info.world_size})"
        )
    if not 0 <= info.local_rank < info.local_world_size:
        size = f"{where('local_world_size')}={info.local_world_size}"
        if src.get("local_world_size") in ("default", "assumed single node"):
            size = (
                f"a local world size of {info.local_world_size}: LOCAL_WORLD_SIZE is not set "
                f"(nor the launcher's own), so all {where('world_size')}={info.world_size} ranks "
                f"were assumed to run on this node. Export LOCAL_WORLD_SIZE=<ranks per node>"
            )
        raise LaunchEnvError(
            f"{where('local_rank')}={info.local_rank} is out of range for {size}; local ranks "
            f"run from 0 to {info.local_world_size - 1}"
        )
    if not 0 <= info.node_rank < max(info.num_nodes, 1):
        raise LaunchEnvError(
            f"{where('node_rank')}={info.node_rank} is out of range for {info.num_nodes} node(s)"
        )
    return info


def _master(
    reader: _Reader,
    *,
    single_node: bool,
    world_size: int,
    fallback_port: Callable[[], tuple[int, str] | None],
    multi_node_addr: str | None = None,
    multi_node_addr_source: str = "",
) -> tuple[str, int | None]:
    """Resolve MASTER_ADDR/MASTER_PORT with the launcher's own fallbacks."""
    addr = reader.str("master_addr", "MASTER_ADDR")
    if addr is None:
        if single_node:
            addr = LOOPBACK
            reader.sources["master_addr"] = "single node: loopback"
        elif multi_node_addr is not None:
            addr = multi_node_addr
            reader.sources["master_addr"] = multi_node_addr_source
        else:
            raise LaunchEnvError(
                f"{reader.launcher} launch across several nodes but MASTER_ADDR is not set; "
                f"export MASTER_ADDR=<hostname or IP of the rank-0 node> (and MASTER_PORT) "
                f"for every rank, e.g. in the job script before mpirun"
            )
    port = _port(reader)
    if port is None and world_size > 1:
        derived = fallback_port()
        if derived is None:
            raise LaunchEnvError(
                f"{reader.launcher} launch with {world_size} ranks but MASTER_PORT is not set; "
                f"export MASTER_PORT=<free port, same on every rank>"
            )
        port, why = derived
        reader.sources["master_port"] = why
    return addr, port


def _proc_parent(pid: int) -> tuple[str, int] | None:
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


def _ancestor_named(names: Iterable[str], pid: int | None = None) -> int | None:
    """The pid of the nearest ancestor of ``pid`` (default: this process) named in ``names``.

    Example:
        >>> _ancestor_named(["no-such-launcher"]) is None
        True
    """
    wanted = set(names)
    start = current = os.getpid() if pid is None else pid
    for _ in range(64):  # a process tree is never this deep; bounds the /proc walk
        found = _proc_parent(current)
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
    the ancestor of every local rank (also through ``bash -c`` wrappers). Read only for this
    process's own environment, so :func:`detect` stays pure for the mappings tests pass.

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
    proxy = _ancestor_named(("hydra_pmi_proxy",))
    if proxy is None:
        return None
    why = f"derived from the hydra_pmi_proxy pid {proxy} (MPICH sets no job id)"
    # A pid has no steps: its low bits take the step slots, so pids spread over all 20000
    # ports (two jobs meet only when their proxies' pids are a multiple of 20000 apart).
    return derived_port(proxy // PORT_STEP_SLOTS, proxy % PORT_STEP_SLOTS), why


def derived_port(job: int, step: int = 0) -> int:
    """The port every rank of a job derives alike when no ``MASTER_PORT`` is exported.

    ``15000 + (job % 1250) * 16 + step % 16``: each job id has 16 ports, one per step, so
    jobs whose ids are less than 1250 apart never share a port, nor do steps of one job
    less than 16 apart. (A sum such as ``job + step`` gave job J's step 1 and job J+1's step
    0 one port.) Should two jobs still meet on one port, the rendezvous compares their
    :attr:`ProcessInfo.job_identity` and refuses the second one.

    Example:
        >>> derived_port(4242, 0), derived_port(4242, 1), derived_port(4243, 0)
        (22872, 22873, 22888)
    """
    slots = SLURM_PORT_SPAN // PORT_STEP_SLOTS
    return SLURM_PORT_BASE + (job % slots) * PORT_STEP_SLOTS + step % PORT_STEP_SLOTS


def _port_for(key: str) -> int:
    """:func:`derived_port` of a launcher's job-id text such as ``4242.0`` or ``prterun-n1-77@1``.

    The last two numbers in the text (before a ``;``) are taken as job and step, a single
    number as the job; text without digits is hashed. Ids that count up, as job ids and
    pids do, thus get distinct ports, as :func:`derived_port` promises.
    """
    numbers = [int(n) for n in re.findall(r"\d+", key.split(";")[0])]
    if not numbers:
        return derived_port(zlib.crc32(key.encode()))
    if len(numbers) == 1:
        return derived_port(numbers[0])
    return derived_port(numbers[-2], numbers[-1])


def _job_port(env: Mapping[str, str], names: Iterable[str]) -> tuple[int, str] | None:
    """A port every rank of one job derives alike from the job's id."""
    for name in names:
        value = env.get(name)
        if value:
            return _port_for(value), f"derived from {name}={value}"
    return None


# --------------------------------------------------------------------------- detectors

_TORCHRUN_MARKERS = ("TORCHELASTIC_RUN_ID", "GROUP_RANK", "TORCHELASTIC_RESTART_COUNT")


def _torchrun(env: Mapping[str, str]) -> ProcessInfo | None:
    if not any(m in env for m in _TORCHRUN_MARKERS) or "RANK" not in env:
        return None
    name = "accelerate" if "ACCELERATE_MIXED_PRECISION" in env else "torchrun"
    r = _Reader(env, name)
    r.int("rank", "RANK")
    world = r.int("world_size", "WORLD_SIZE")
    r.int("local_rank", "LOCAL_RANK")
    local_world = r.int("local_world_size", "LOCAL_WORLD_SIZE", default=world)
    r.int("node_rank", "GROUP_RANK", default=0)
    r.int("num_nodes", "GROUP_WORLD_SIZE", default=_num_nodes(world, local_world))
    r.int("restart_count", "TORCHELASTIC_RESTART_COUNT", default=0)
    r.check_counts()
    addr = r.str("master_addr", "MASTER_ADDR")
    if addr is None:
        addr = LOOPBACK
        r.sources["master_addr"] = "default: loopback"
    port = _port(r)
    if port is None and world > 1:
        # world 1 needs no store: that is also what devlayer.init() of a single process
        # exports (ProcessInfo.torch_env), which its child processes inherit.
        raise LaunchEnvError(
            f"torchrun set RANK but not MASTER_PORT (WORLD_SIZE={world}); is this a torchrun "
            f"child? export MASTER_PORT=<free port, same on every rank>"
        )
    return r.info(master_addr=addr, master_port=port)


def _env(env: Mapping[str, str]) -> ProcessInfo | None:
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    r = _Reader(env, "env")
    rank = r.int("rank", "RANK")
    world = r.int("world_size", "WORLD_SIZE")
    if "LOCAL_RANK" in env:
        r.int("local_rank", "LOCAL_RANK")
        local_world = r.int("local_world_size", "LOCAL_WORLD_SIZE", default=world)
    else:  # a hand-written env:// job on one machine
        r.put("local_rank", rank, "assumed single node")
        local_world = r.put("local_world_size", world, "assumed single node")
    num_nodes = r.put("num_nodes", _num_nodes(world, local_world))
    if r.first(("GROUP_RANK", "NODE_RANK")) is not None:
        r.int("node_rank", ("GROUP_RANK", "NODE_RANK"))
    else:  # block placement, as torchrun and `devlayer launch` do
        r.put("node_rank", rank // local_world if local_world > 0 else 0, _BLOCK_PLACEMENT)
    r.check_counts()
    addr, port = _master(
        r, single_node=num_nodes == 1, world_size=world, fallback_port=lambda: None
    )
    return r.info(master_addr=addr, master_port=port)


_BLOCK_PLACEMENT = "rank // local_world_size"


def _mpi(
    name: str,
    rank_vars: tuple[str, ...],
    size_vars: tuple[str, ...],
    local_rank_vars: tuple[str, ...],
    local_size_vars: tuple[str, ...],
    node_vars: tuple[str, ...] = (),
    job_vars: tuple[str, ...] = (),
    job_key: Callable[[Mapping[str, str], int], tuple[int, str] | None] = lambda env, n: None,
) -> Callable[[Mapping[str, str]], ProcessInfo | None]:
    """Build a detector for an MPI-style launcher from its variable names.

    ``job_key(env, num_nodes)`` is the port fallback for launchers whose environment names
    no job (tried after ``job_vars``, before the default port); it may refuse a job that
    spans several nodes, where a per-node value would give each node its own port.
    """

    def detector(env: Mapping[str, str]) -> ProcessInfo | None:
        if not any(v in env for v in rank_vars):
            return None
        r = _Reader(env, name, job_vars)
        rank = r.int("rank", rank_vars)
        world = r.int("world_size", size_vars)
        local_rank = r.int("local_rank", local_rank_vars, default=-1)
        local_world = r.int("local_world_size", local_size_vars, default=-1)
        if local_rank < 0 or local_world < 0:  # launcher did not say: assume one node
            r.put("local_rank", rank, "assumed single node")
            local_world = r.put("local_world_size", world, "assumed single node")
        num_nodes = r.put("num_nodes", _num_nodes(world, local_world))
        if node_vars and r.first(node_vars):
            r.int("node_rank", node_vars)
        else:
            r.put("node_rank", rank // local_world if local_world > 0 else 0, _BLOCK_PLACEMENT)
        r.check_counts()
        addr, port = _master(
            r,
            single_node=num_nodes == 1,
            world_size=world,
            fallback_port=lambda: (
                _job_port(env, job_vars) or job_key(env, num_nodes) or (DEFAULT_PORT, "default")
            ),
        )
        return r.info(master_addr=addr, master_port=port)

    return detector


_openmpi = _mpi(
    "openmpi",
    ("OMPI_COMM_WORLD_RANK",),
    ("OMPI_COMM_WORLD_SIZE",),
    ("OMPI_COMM_WORLD_LOCAL_RANK",),
    ("OMPI_COMM_WORLD_LOCAL_SIZE",),
    job_vars=("OMPI_MCA_ess_base_jobid", "PMIX_NAMESPACE", "OMPI_MCA_orte_hnp_uri"),
)
_mvapich = _mpi(
    "mvapich",
    ("MV2_COMM_WORLD_RANK",),
    ("MV2_COMM_WORLD_SIZE",),
    ("MV2_COMM_WORLD_LOCAL_RANK",),
    ("MV2_COMM_WORLD_LOCAL_SIZE",),
    job_vars=("MPIRUN_ID", "SLURM_JOB_ID"),
)
_pals = _mpi(
    "pals",
    ("PALS_RANKID",),
    ("PALS_SIZE", "PMI_SIZE"),
    ("PALS_LOCAL_RANKID",),
    ("PALS_LOCAL_SIZE", "MPI_LOCALNRANKS"),
    node_vars=("PALS_NODEID",),
    job_vars=("PALS_APID", "PBS_JOBID"),
)
_mpich = _mpi(
    "mpich",
    ("PMI_RANK",),
    ("PMI_SIZE",),
    ("MPI_LOCALRANKID",),
    ("MPI_LOCALNRANKS",),
    job_vars=("PMI_JOBID", "I_MPI_JOB_ID", "PBS_JOBID", "SLURM_JOB_ID"),
    job_key=_hydra_port,
)
_pmix = _mpi(
    "pmix",
    ("PMIX_RANK",),
    ("PMIX_SIZE", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"),
    ("PMIX_LOCAL_RANK", "SLURM_LOCALID"),
    ("PMIX_LOCAL_SIZE",),
    job_vars=("PMIX_NAMESPACE", "SLURM_JOB_ID"),
)

# Slurm step ids that are not srun steps: the batch script, the extern step and the
# interactive step of salloc. Numeric forms from slurm.h: since 20.11 batch = 0xfffffffb,
# interactive = 0xfffffffa, extern = 0xfffffffc, pending = 0xfffffffd; before 20.11
# batch = 0xfffffffe, extern = 0xffffffff.
_SLURM_NON_SRUN_STEPS = {
    "batch",
    "extern",
    "interactive",
    "pending",
    "4294967290",
    "4294967291",
    "4294967292",
    "4294967293",
    "4294967294",
    "4294967295",
}
_SRUN_MARKERS = ("SLURM_STEP_NUM_TASKS", "SLURM_SRUN_COMM_PORT", "SLURM_STEP_LAUNCHER_PORT")


def _slurm_is_srun(env: Mapping[str, str]) -> bool:
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
    if step is not None and step.strip().lower() in _SLURM_NON_SRUN_STEPS:
        return False
    return any(m in env for m in _SRUN_MARKERS) or step is not None


def _slurm(env: Mapping[str, str]) -> ProcessInfo | None:
    if "SLURM_PROCID" not in env or not _slurm_is_srun(env):
        return None
    r = _Reader(env, "slurm", ("SLURM_JOB_ID", "SLURM_JOBID"), ("SLURM_STEP_ID", "SLURM_STEPID"))
    r.int("rank", "SLURM_PROCID")
    world = r.int("world_size", ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"))
    r.int("local_rank", "SLURM_LOCALID")
    node_rank = r.int("node_rank", "SLURM_NODEID", default=0)
    num_nodes = r.int(
        "num_nodes", ("SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES"), default=1
    )
    per_node_var = r.first(("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"))
    if per_node_var is not None:
        counts = expand_tasks_per_node(per_node_var[1])
        if node_rank >= len(counts):
            raise LaunchEnvError(
                f"SLURM_NODEID={node_rank} but {per_node_var[0]}={per_node_var[1]!r} lists "
                f"only {len(counts)} node(s)"
            )
        r.put("local_world_size", counts[node_rank], f"{per_node_var[0]}[{node_rank}]")
    else:
        r.int("local_world_size", "SLURM_NTASKS_PER_NODE", default=world)
    r.check_counts()
    nodelist = r.first(("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"))
    first_host = expand_nodelist(nodelist[1])[0] if nodelist else None
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", "0"))
    job = env.get("SLURM_JOB_ID", env.get("SLURM_JOBID"))

    def job_port() -> tuple[int, str] | None:
        if not job:
            return None
        port = derived_port(_as_int(job), _as_int(step))
        return port, f"derived from SLURM_JOB_ID={job}, SLURM_STEP_ID={step}"

    addr, port = _master(
        r,
        single_node=num_nodes == 1,
        world_size=world,
        fallback_port=job_port,
        multi_node_addr=first_host,
        multi_node_addr_source=f"first node of {nodelist[0]}" if nodelist else "",
    )
    return r.info(master_addr=addr, master_port=port)


def _as_int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        return zlib.crc32(value.encode())


#: Detectors in precedence order. ``env`` is handled specially (see :func:`detect`).
LAUNCHERS: dict[str, Callable[[Mapping[str, str]], ProcessInfo | None]] = {
    "torchrun": _torchrun,
    "env": _env,
    "openmpi": _openmpi,
    "mvapich": _mvapich,
    "pals": _pals,
    "mpich": _mpich,
    "pmix": _pmix,
    "slurm": _slurm,
}
_ALIASES = {
    "accelerate": "torchrun",
    "torchelastic": "torchrun",
    "intelmpi": "mpich",
    "srun": "slurm",
    "mpi": "openmpi",
    "spawn": "env",
}

_COMPARED = (("rank", "RANK"), ("world_size", "WORLD_SIZE"), ("local_rank", "LOCAL_RANK"))
_MPI_FAMILY = ("openmpi", "mvapich", "pals", "mpich", "pmix")


def _single(env: Mapping[str, str], notes: tuple[str, ...] = ()) -> ProcessInfo:
    r = _Reader(env, "none")
    r.sources["rank"] = "single process"
    return r.info(notes=notes)


def detect(
    env: Mapping[str, str], *, disable: Iterable[str] = (), force: str | None = None
) -> ProcessInfo:
    """Describe this process from a launcher environment.

    Args:
        env: The environment to read, usually ``os.environ``. Never modified.
        disable: Detector names to skip (also ``DEVLAYER_DISABLE_LAUNCHERS=slurm,mpich``).
        force: Use only this detector (also ``DEVLAYER_LAUNCHER``); ``none`` = one process.

    Returns:
        A validated :class:`ProcessInfo`.

    Raises:
        LaunchEnvError: Values that are missing, not integers, out of range, or that
            disagree between a hand-set ``RANK`` and a scheduler/MPI launcher.

    Example:
        >>> detect({}).launcher
        'none'
        >>> detect({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "29511"}).rank
        1
    """
    force_origin = "force"
    if force is None and env.get("DEVLAYER_LAUNCHER", "").strip():
        force, force_origin = env["DEVLAYER_LAUNCHER"], "DEVLAYER_LAUNCHER"
    if force is not None and force.strip().lower() == "auto":
        force = None
    disabled = _disabled(env, disable)
    if force is not None:
        return _forced(env, force, force_origin)
    chosen, hand, hand_error = _first_match(env, disabled)
    if chosen is None:
        if hand_error is not None:
            raise hand_error
        if hand is not None:
            return _validate(hand)
        _refuse_world_without_rank(env)
        notes: tuple[str, ...] = ()
        if "SLURM_JOB_ID" in env and "slurm" not in disabled:
            notes = (
                "SLURM allocation without srun (sbatch/salloc shell): running as one process; "
                "start the script with srun or torchrun for several ranks",
            )
        return _single(env, notes)
    if chosen.launcher in _MPI_FAMILY:
        _check_mpi_families_agree(env, chosen, disabled)
    if hand is not None or hand_error is not None:
        _check_hand_set_agrees(env, chosen)
        chosen = replace(
            chosen, sources={**chosen.sources}, notes=(*chosen.notes, "RANK/WORLD_SIZE agree")
        )
    return _validate(chosen)


#: Variables a torchrun-style world is described by, in the order an error lists them.
_WORLD_VARS = (
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
)


def _refuse_world_without_rank(env: Mapping[str, str]) -> None:
    """``WORLD_SIZE`` > 1 without ``RANK`` and no launcher: an error, not one process.

    Running as world size 1 would train alone and write checkpoints as if it were the
    whole job. ``WORLD_SIZE=1`` alone still means one process.
    """
    size = env.get("WORLD_SIZE", "").strip()
    if not size or size == "1" or env.get("RANK", "").strip():
        return  # RANK set too: its detector was disabled, which is the user's choice
    seen = ", ".join(f"{v}={env[v].strip()}" for v in _WORLD_VARS if env.get(v, "").strip())
    raise LaunchEnvError(
        f"WORLD_SIZE={size} but RANK is not set (seen: {seen}), and no launcher "
        f"(torchrun, srun, mpirun) says which rank this process is; export RANK=<0.."
        f"WORLD_SIZE-1> for every process, start the job with its launcher, or unset "
        f"WORLD_SIZE (or set DEVLAYER_LAUNCHER=none) to run as one process"
    )


def _known() -> str:
    return ", ".join(["none", *LAUNCHERS])


def _disabled(env: Mapping[str, str], disable: Iterable[str]) -> set[str]:
    """The detectors to skip: ``disable`` and ``DEVLAYER_DISABLE_LAUNCHERS``, aliases resolved."""
    disabled: set[str] = set()
    for origin, names in (
        ("disable", list(disable)),
        ("DEVLAYER_DISABLE_LAUNCHERS", env.get("DEVLAYER_DISABLE_LAUNCHERS", "").split(",")),
    ):
        for raw in names:
            name = _ALIASES.get(raw.strip().lower(), raw.strip().lower())
            if not name:
                continue
            if name not in LAUNCHERS:
                raise LaunchEnvError(
                    f"{origin} names {raw.strip()!r}, which is not a launcher; known: {_known()}"
                )
            disabled.add(name)
    return disabled


def _forced(env: Mapping[str, str], force: str, origin: str) -> ProcessInfo:
    """The one detector ``force`` (or ``DEVLAYER_LAUNCHER``) names; ``none``: one process."""
    key = _ALIASES.get(force.strip().lower(), force.strip().lower())
    if key == "none":
        return _single(env, (f"{origin}=none: launcher variables ignored",))
    if key not in LAUNCHERS:
        raise LaunchEnvError(
            f"{origin}={force!r} is not a known launcher; known: {_known()} (or auto)"
        )
    found = LAUNCHERS[key](env)
    if found is None:
        raise LaunchEnvError(
            f"{origin}={force!r} but the environment has none of that launcher's "
            f"variables; use {origin}=auto to auto-detect"
        )
    return _validate(found)


def _first_match(
    env: Mapping[str, str], disabled: set[str]
) -> tuple[ProcessInfo | None, ProcessInfo | None, LaunchEnvError | None]:
    """``(first matching detector's info, hand-set env's info, hand-set env's error)``."""
    hand: ProcessInfo | None = None
    hand_error: LaunchEnvError | None = None
    for name, detector in LAUNCHERS.items():
        if name in disabled:
            continue
        if name == "env":
            # Hand-set RANK/WORLD_SIZE are only compared with a scheduler or MPI detector
            # below (whose values are then used); their own errors, such as a missing
            # MASTER_PORT that srun would derive, matter only when nothing else matches.
            try:
                hand = detector(env)
            except LaunchEnvError as exc:
                hand_error = exc
            continue
        found = detector(env)
        if found is not None:
            # The first match wins; torchrun's also inside srun or mpirun.
            chosen = _srun_launched(env, found, disabled) if name in _MPI_FAMILY else found
            return chosen, hand, hand_error
    return None, hand, hand_error


def _check_hand_set_agrees(env: Mapping[str, str], chosen: ProcessInfo) -> None:
    """A hand-set RANK, WORLD_SIZE or LOCAL_RANK must agree with the launcher that matched.

    Compare only what was really exported: when LOCAL_RANK is absent the env detector
    assumes one node, which says nothing about a multi-node srun step.
    """
    for fieldname, var, mine in _hand_set(env):
        theirs = getattr(chosen, fieldname)
        if mine != theirs:
            raise LaunchEnvError(
                f"conflicting launcher variables: {var}={mine} "
                f"but {chosen.sources.get(fieldname)}={theirs} ({chosen.launcher}); unset the "
                f"hand-set one, or set DEVLAYER_LAUNCHER=env or ={chosen.launcher} to choose"
            )


def _check_mpi_families_agree(
    env: Mapping[str, str], chosen: ProcessInfo, disabled: set[str]
) -> None:
    """Variables of two MPI families (``OMPI_*`` and ``PMI_RANK``...) must agree.

    The first family in precedence order wins; when another one's variables are also set
    (a stale export, a nested launch) and name a different rank or size, that is the same
    conflict as a hand-set ``RANK``, not a silent choice. PMIx is not compared: OpenMPI and
    ``srun --mpi=pmix`` set ``PMIX_RANK`` themselves, and its size may come from SLURM.
    """
    for name in _MPI_FAMILY:
        if name in (chosen.launcher, "pmix") or name in disabled:
            continue
        try:
            other = LAUNCHERS[name](env)
        except LaunchEnvError:
            continue  # incomplete variables of another family: nothing to compare
        if other is None:
            continue
        for fieldname in ("rank", "world_size"):
            mine, theirs = getattr(chosen, fieldname), getattr(other, fieldname)
            if mine != theirs:
                raise LaunchEnvError(
                    f"conflicting launcher variables: {chosen.sources.get(fieldname)}={mine} "
                    f"({chosen.launcher}) but {other.sources.get(fieldname)}={theirs} "
                    f"({other.launcher}); unset the stale ones, or set "
                    f"DEVLAYER_LAUNCHER={chosen.launcher} or ={other.launcher} to choose"
                )


def _hand_set(env: Mapping[str, str]) -> list[tuple[str, str, int]]:
    """``(field, variable, value)`` for each of RANK, WORLD_SIZE, LOCAL_RANK that is set."""
    r = _Reader(env, "env")
    return [
        (fieldname, var, r.int(fieldname, var))
        for fieldname, var in _COMPARED
        if r.first((var,)) is not None
    ]


def _srun_launched(env: Mapping[str, str], found: ProcessInfo, disabled: set[str]) -> ProcessInfo:
    """Prefer SLURM's layout when srun itself started MPI-style ranks.

    ``srun --mpi=pmi2`` sets ``PMI_RANK``/``PMI_SIZE`` and ``srun --mpi=pmix`` sets
    ``PMIX_RANK``, but neither says how many ranks share a node, so the MPI detector would
    assume one node (loopback MASTER_ADDR, local_rank = rank). When the srun step's own
    rank and size agree, srun is the launcher and its per-node values are the right ones.
    ``mpirun`` inside an allocation always gives local ranks, so it never gets here.
    """
    if found.sources.get("local_world_size") != "assumed single node" or "slurm" in disabled:
        return found
    try:
        srun = _slurm(env)
    except LaunchEnvError:
        return found
    if srun is None or (srun.rank, srun.world_size) != (found.rank, found.world_size):
        return found
    return replace(
        srun,
        notes=(
            *srun.notes,
            f"{found.launcher} variables without local ranks: srun started the tasks "
            f"(srun --mpi=...), so SLURM's node layout is used",
        ),
    )


def launched(env: Mapping[str, str] | None = None) -> bool:
    """True when a launcher started this process as one of several ranks.

    torchrun, ``accelerate launch``, ``srun``, ``mpirun``/``mpiexec`` and
    :func:`devlayer.spawn` children all count; plain ``python`` and the batch shell of
    ``sbatch``/``salloc`` do not. Scripts that start their own ranks use it to decide:

        main() if devlayer.launched() else devlayer.spawn(main, nprocs=2)

    (:func:`devlayer.spawn` itself runs ``fn`` in place under a launcher.)

    Args:
        env: The environment to read; default ``os.environ``.

    Raises:
        LaunchEnvError: The launcher variables are inconsistent (as :func:`detect`).

    Example:
        >>> launched({})
        False
        >>> launched({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "29511"})
        True
    """
    return detect(os.environ if env is None else env).world_size > 1
