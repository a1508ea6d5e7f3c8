"""What every launcher module shares: :class:`ProcessInfo`, the :class:`Launcher` record,
the environment reader, validation and the port rules.

A launcher module reads its variables through an :class:`EnvReader`, resolves the store
with :func:`resolve_master` and exports one :class:`Launcher` record; the precedence list
in :mod:`devlayer.launchers.precedence` picks among the records. Everything here is a pure
function of the mapping it is given.

Example:
    >>> r = EnvReader({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "29511"}, "env")
    >>> r.int("rank", "RANK"), r.int("world_size", "WORLD_SIZE"), r.sources["rank"]
    (1, 2, 'RANK')
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from devlayer.errors import LaunchEnvError

__all__ = [
    "BLOCK_PLACEMENT",
    "DEFAULT_PORT",
    "LOOPBACK",
    "PORT_STEP_SLOTS",
    "SCHEDULER_JOB_ID_VARS",
    "Detector",
    "EnvReader",
    "Launcher",
    "ProcessInfo",
    "derived_port",
    "distinct_hosts",
    "expand_nodelist",
    "expand_tasks_per_node",
    "host_names",
    "job_port",
    "local_world_from_nodes",
    "num_nodes",
    "number_or_hash",
    "port_for_key",
    "read_hostfile",
    "read_port",
    "refuse_node_without_local_world",
    "resolve_master",
    "validate",
]

LOOPBACK = "127.0.0.1"
DEFAULT_PORT = 29500
SLURM_PORT_BASE = 15000
SLURM_PORT_SPAN = 20000
#: Ports per job in the derived-port rule: steps 0..15 of one job get ports of their own.
PORT_STEP_SLOTS = 16
#: The source of a node rank derived by block placement, as torchrun and `devlayer launch` do.
BLOCK_PLACEMENT = "rank // local_world_size"
#: Job ids of the torchrun agent and of schedulers, which every launcher started inside
#: them inherits: tried after a launcher's own job-id variables.
SCHEDULER_JOB_ID_VARS = ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID")


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
        max_restarts: How often the elastic agent may restart it (torchrun's
            ``--max-restarts``; 0 elsewhere).
        agent_store: torchrun's agent shares its rendezvous store with the workers
            (``TORCHELASTIC_USE_AGENT_STORE=True``, torch's default with a c10d rendezvous
            unless ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``); such a job cannot grow back
            (docs/checkpoints.md, "With torchrun's elastic mode").
        agent_supervised: an elastic agent (torchrun's) supervises the workers: it stops
            every worker when one fails and hosts or outlives their store, so devlayer's
            survivor watch has nothing to add (``TORCHELASTIC_RUN_ID`` is set).
        sources: Which environment variable (or rule) gave each field.
        notes: Remarks for ``devlayer info`` (e.g. "sbatch shell without srun").
        job_id: The launcher's or scheduler's job id as ``VARIABLE=value``
            (``SLURM_JOB_ID=42``), or ``None``; also set for the one process of an
            ``sbatch`` shell. For logs, lock files and :attr:`job_identity`.
        job_step: The step of the job as ``VARIABLE=value`` (``SLURM_STEP_ID=1``) when the
            launcher is a scheduler whose steps are separate worlds (``srun``), else ``None``.
        cpus_per_rank: The CPUs this rank has for itself when the launcher gives each rank
            its own (``SLURM_CPUS_PER_TASK`` under ``srun``), else ``None``: the CPUs this
            process may use are then shared by the ``local_world_size`` ranks of its node.
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
    cpus_per_rank: int | None = field(default=None, compare=False)
    max_restarts: int = field(default=0, compare=False)
    agent_store: bool = field(default=False, compare=False)
    agent_supervised: bool = field(default=False, compare=False)

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


#: A detector: the :class:`ProcessInfo` its launcher describes, or ``None`` when the
#: environment holds none of its marker variables.
Detector = Callable[[Mapping[str, str]], "ProcessInfo | None"]


@dataclass(frozen=True)
class Launcher:
    """One launcher family: what :func:`devlayer.launchers.detect` needs to know of it.

    Attributes:
        name: The name ``DEVLAYER_LAUNCHER`` and ``ProcessInfo.launcher`` use.
        detect: ``env -> ProcessInfo | None``; ``None`` when its variables are absent.
        aliases: Other names ``DEVLAYER_LAUNCHER`` and ``DEVLAYER_DISABLE_LAUNCHERS`` accept.
        prefixes: Prefixes of the variables it sets (``devlayer.testing`` hides them).
        variables: Whole names of the variables it sets that no prefix covers.
        job_id_vars: Its job-id variables, most specific first (``ProcessInfo.job_id``).
        family: ``"mpi"`` for MPI launchers: their ranks are compared with the other MPI
            families' variables, and srun's layout is used when srun started them.
        compared: False for a family member whose variables others set too (PMIx), so
            they are not compared with the one that matched.
        rank_vars: The variables naming its rank: when one is set, it and ``size_vars``
            are compared raw with the family member that matched (even where this
            launcher's own detection would fail).
        size_vars: The variables naming its world size.

    Example:
        >>> toy = Launcher("toy", detect=lambda env: None, prefixes=("TOY_",))
        >>> toy.name, toy.aliases
        ('toy', ())
    """

    name: str
    detect: Detector
    aliases: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    variables: tuple[str, ...] = ()
    job_id_vars: tuple[str, ...] = ()
    family: str = ""
    compared: bool = True
    rank_vars: tuple[str, ...] = ()
    size_vars: tuple[str, ...] = ()


class EnvReader:
    """Reads one launcher's variables, records each field's value and source, builds the result.

    A detector reads its fields through :meth:`int` (or sets derived ones with :meth:`put`)
    and ends with :meth:`info`: the one place a :class:`ProcessInfo` is made.

    Args:
        env: The environment mapping (never modified).
        launcher: The launcher's name, for ``ProcessInfo.launcher`` and error messages.
        job_vars: The launcher's job-id variables; :data:`SCHEDULER_JOB_ID_VARS` follow.
        step_vars: Variables naming the job step, for ``ProcessInfo.job_step``.
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
        self.job_vars = (*job_vars, *SCHEDULER_JOB_ID_VARS)
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
        validate(self.info())

    def first(self, names: Iterable[str]) -> tuple[str, str] | None:
        """``(name, stripped value)`` of the first of ``names`` set and not blank."""
        for name in names:
            value = self.env.get(name)
            if value is not None and value.strip() != "":
                return name, value.strip()
        return None

    def int(self, fieldname: str, names: Iterable[str] | str, default: int | None = None) -> int:
        """Read ``fieldname`` from the first of ``names`` set, else ``default``.

        Raises:
            LaunchEnvError: None is set and there is no default, or the value is no integer.
        """
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
        """Read a text field from the first of ``names`` set, else ``None``."""
        names = (names,) if isinstance(names, str) else tuple(names)
        found = self.first(names)
        if found is None:
            return None
        self.sources[fieldname] = found[0]
        return found[1]


def read_port(reader: EnvReader, names: Iterable[str] = ("MASTER_PORT",)) -> int | None:
    """The port the first of ``names`` gives, checked to be in 1..65535, else ``None``.

    Raises:
        LaunchEnvError: The value is no number or out of range.
    """
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


def num_nodes(world: int, local_world: int) -> int:
    """Nodes needed for ``world`` ranks at ``local_world`` per node (rounded up).

    Never divides by zero: a size < 1 is reported by :func:`validate` with the variable's
    name instead of a ZeroDivisionError.

    Example:
        >>> num_nodes(8, 4), num_nodes(5, 4), num_nodes(2, 0)
        (2, 2, 1)
    """
    if local_world < 1 or world < 1:
        return 1
    return max(-(-world // local_world), 1)


def validate(info: ProcessInfo) -> ProcessInfo:
    """``info`` when its counts are consistent, else a :class:`LaunchEnvError` naming the
    variable that gave the bad value and the range it must be in."""
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
        nodes = f"{info.num_nodes} node(s)"
        if "num_nodes" in src:
            nodes = f"{nodes} ({src['num_nodes']})"
        raise LaunchEnvError(
            f"{where('node_rank')}={info.node_rank} is out of range for {nodes}; node ranks "
            f"run from 0 to {info.num_nodes - 1}"
        )
    return info


def refuse_node_without_local_world(reader: EnvReader, world: int) -> None:
    """A node rank (``GROUP_RANK``/``NODE_RANK``) without ``LOCAL_WORLD_SIZE``: an error.

    The job says it has nodes, but not how many ranks each holds: taking all ``world`` for
    this node would make node 0 the whole job and any other node "out of range".

    Raises:
        LaunchEnvError: Several ranks, a node rank set and no ``LOCAL_WORLD_SIZE``.
    """
    node_var = reader.first(("GROUP_RANK", "NODE_RANK"))
    if node_var is None or world < 2 or reader.first(("LOCAL_WORLD_SIZE",)) is not None:
        return
    raise LaunchEnvError(
        f"{node_var[0]}={node_var[1]} names a node of a job across nodes, but "
        f"LOCAL_WORLD_SIZE is not set, so devlayer cannot tell how many of the "
        f"{reader.sources.get('world_size', 'WORLD_SIZE')}={world} ranks run on each node "
        f"(it would take all of them for this one); export LOCAL_WORLD_SIZE=<ranks per node> "
        f"(and LOCAL_RANK) for every rank"
    )


def resolve_master(
    reader: EnvReader,
    *,
    single_node: bool,
    world_size: int,
    fallback_port: Callable[[], tuple[int, str] | None],
    multi_node_addr: str | None = None,
    multi_node_addr_source: str = "",
) -> tuple[str, int | None]:
    """Resolve MASTER_ADDR/MASTER_PORT with the launcher's own fallbacks.

    Args:
        reader: The launcher's reader (records the sources).
        single_node: All ranks on one node: loopback when ``MASTER_ADDR`` is unset.
        world_size: Ranks in the job; a single rank needs no port.
        fallback_port: ``(port, why)`` when ``MASTER_PORT`` is unset, or ``None``.
        multi_node_addr: The store host across nodes when ``MASTER_ADDR`` is unset.
        multi_node_addr_source: Where ``multi_node_addr`` came from.

    Raises:
        LaunchEnvError: Several nodes and no address, or several ranks and no port.
    """
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
    port = read_port(reader)
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


def port_for_key(key: str) -> int:
    """:func:`derived_port` of a launcher's job-id text such as ``4242.0`` or ``prterun-n1-77@1``.

    The last two numbers in the text (before a ``;``) are taken as job and step, a single
    number as the job; text without digits is hashed. Ids that count up, as job ids and
    pids do, thus get distinct ports, as :func:`derived_port` promises.

    Example:
        >>> port_for_key("4242.1") == derived_port(4242, 1)
        True
    """
    numbers = [int(n) for n in re.findall(r"\d+", key.split(";")[0])]
    if not numbers:
        return derived_port(zlib.crc32(key.encode()))
    if len(numbers) == 1:
        return derived_port(numbers[0])
    return derived_port(numbers[-2], numbers[-1])


def job_port(env: Mapping[str, str], names: Iterable[str]) -> tuple[int, str] | None:
    """``(port, why)`` every rank of one job derives alike from the first job id set."""
    for name in names:
        value = env.get(name)
        if value:
            return port_for_key(value), f"derived from {name}={value}"
    return None


def number_or_hash(value: str) -> int:
    """``int(value)``, or a stable hash of a value that is no number (a job id text).

    Example:
        >>> number_or_hash("42"), number_or_hash("abc") == number_or_hash("abc")
        (42, True)
    """
    try:
        return int(value)
    except ValueError:
        return zlib.crc32(value.encode())


def host_names(text: str) -> list[str]:
    """The host names of a list separated by commas and/or white space, blanks dropped.

    Example:
        >>> host_names("alpha beta, gamma ,")
        ['alpha', 'beta', 'gamma']
    """
    return [host for host in re.split(r"[\s,]+", text) if host]


def distinct_hosts(hosts: Iterable[str]) -> list[str]:
    """``hosts`` without repeats, in the order each first appears.

    Example:
        >>> distinct_hosts(["n2", "n2", "n1", "n2"])
        ['n2', 'n1']
    """
    return list(dict.fromkeys(hosts))


def read_hostfile(env: Mapping[str, str], name: str) -> list[str] | None:
    """The hosts, one per line (first word), of the host file the variable ``name`` names.

    Schedulers write these files (``PBS_NODEFILE``, ``LSB_DJOB_HOSTFILE``) with one line per
    slot; repeats are kept (see :func:`distinct_hosts`). Only text is read, never code.

    Returns:
        The hosts, or ``None`` when ``name`` is unset or blank.

    Raises:
        LaunchEnvError: The file cannot be read or lists no host.
    """
    path = env.get(name, "").strip()
    if not path:
        return None
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            hosts = [line.split()[0] for line in fh if line.split()]
    except OSError as exc:
        raise LaunchEnvError(
            f"{name}={path!r} cannot be read ({exc.strerror}); devlayer reads the job's hosts "
            f"from it: check the path, or export MASTER_ADDR=<rank-0 host> instead"
        ) from None
    if not hosts:
        raise LaunchEnvError(
            f"{name}={path!r} lists no host; expected one host name per line (or export "
            f"MASTER_ADDR=<rank-0 host>)"
        )
    return hosts


def local_world_from_nodes(
    reader: EnvReader, names: tuple[str, ...], world: int, nodes: int, nodes_source: str
) -> int:
    """The ranks on this node from the first of ``names``; else ``world`` when one node.

    Never assumed across nodes: with several nodes (or an unknown number, ``nodes=0``) and
    none of ``names`` set, the count is unknown, and that is an error naming the variables
    to set.

    Raises:
        LaunchEnvError: Several nodes and none of ``names`` set.
    """
    if reader.first(names) is not None:
        return reader.int("local_world_size", names)
    if nodes == 1 or world == 1:
        return reader.put("local_world_size", world, f"{nodes_source}: all ranks on one node")
    raise LaunchEnvError(
        f"{reader.launcher} launch of {world} ranks, not known to be on one node "
        f"({nodes_source}), but none "
        f"of {', '.join(names)} is set, so devlayer cannot tell how many ranks run on this node "
        f"(device choice, per-node work and thread budgets follow from it); export "
        f"{names[-1] if names else 'LOCAL_WORLD_SIZE'}=<ranks per node> for every rank, or "
        f"start each node's ranks with torchrun"
    )


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM node list such as ``gpu-node[07-09,12],cpu[1-2]``.

    Uses the ``python-hostlist`` package, which handles zero padding, several bracket
    groups per name and several names. Names may be separated by commas, white space or
    both (``"alpha beta gamma"``, ``"a[1-2], b3"``); each host comes back stripped.

    Example:
        >>> expand_nodelist("gpu-node[07-08],login1")
        ['gpu-node07', 'gpu-node08', 'login1']
        >>> expand_nodelist("alpha beta, gamma")
        ['alpha', 'beta', 'gamma']
    """
    import hostlist  # python-hostlist; small and pure Python

    # Brackets never hold blanks, so every comma or blank run outside them separates names.
    spec = re.sub(r"[\s,]+", ",", nodelist.strip()).strip(",")
    try:
        hosts: list[str] = hostlist.expand_hostlist(spec)
    except hostlist.BadHostlist as exc:
        raise LaunchEnvError(
            f"cannot expand the SLURM node list {nodelist!r}: {exc}; expected a form like "
            f"'node[01-04,07]'"
        ) from None
    return [host.strip() for host in hosts if host.strip()]


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
