"""The precedence list of launchers and :func:`detect`, which picks among them.

A new launcher is one module exporting a :class:`~devlayer.launchers.base.Launcher` record
plus one line in :data:`PRECEDENCE`; :func:`detect` takes its names, aliases and families
from the records. Conflicts are errors, never a silent choice: a hand-set ``RANK`` that
disagrees with the scheduler or MPI launcher that matched, or two MPI families naming
different ranks.

Example:
    >>> [launcher.name for launcher in PRECEDENCE][:5]
    ['torchrun', 'ray', 'pytorchjob', 'deepspeed', 'env']
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

from devlayer.errors import LaunchEnvError
from devlayer.launchers.azureml import AZUREML
from devlayer.launchers.base import Detector, EnvReader, Launcher, ProcessInfo, validate
from devlayer.launchers.deepspeed import DEEPSPEED
from devlayer.launchers.env import ENV
from devlayer.launchers.flux import FLUX
from devlayer.launchers.lsf import LSF
from devlayer.launchers.mpi import ASSUMED
from devlayer.launchers.mpich import MPICH
from devlayer.launchers.mvapich import MVAPICH
from devlayer.launchers.openmpi import OPENMPI
from devlayer.launchers.pals import PALS
from devlayer.launchers.pmix import PMIX
from devlayer.launchers.pytorchjob import PYTORCHJOB
from devlayer.launchers.ray import RAY
from devlayer.launchers.slurm import SLURM
from devlayer.launchers.torchrun import TORCHRUN
from devlayer.launchers.trainjob import TRAINJOB

__all__ = ["LAUNCHERS", "PRECEDENCE", "detect", "launched"]

#: Launchers in precedence order: the first that matches wins. ``env`` (hand-set ``RANK``)
#: is compared with the scheduler or MPI launcher below it rather than chosen first.
#: Ray Train sets torchrun's names with ``RAY_*`` markers (and may run inside srun or
#: mpirun), so it comes right after torchrun. Kubeflow's PyTorchJob and DeepSpeed's
#: launcher set ``RANK`` too, with markers of their own, so they come before ``env``;
#: AzureML, LSF and Flux come before the MPI families whose variables they also set
#: (``OMPI_*``, ``PALS_*``, ``PMI_*``).
PRECEDENCE: tuple[Launcher, ...] = (
    TORCHRUN,
    RAY,
    PYTORCHJOB,
    DEEPSPEED,
    ENV,
    AZUREML,
    LSF,
    FLUX,
    OPENMPI,
    MVAPICH,
    PALS,
    MPICH,
    PMIX,
    SLURM,
    TRAINJOB,
)

#: Detector of each launcher in :data:`PRECEDENCE`, by name, in precedence order.
LAUNCHERS: Mapping[str, Detector] = {launcher.name: launcher.detect for launcher in PRECEDENCE}

_COMPARED = (("rank", "RANK"), ("world_size", "WORLD_SIZE"), ("local_rank", "LOCAL_RANK"))

#: Variables a torchrun-style world is described by, in the order an error lists them.
_WORLD_VARS = (
    "RANK",
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


#: Variables that describe a rank of a multi-rank job; set without ``RANK`` they are an error
#: unless their value (in :data:`_ALONE_IS_ONE`) describes a single process.
_PARTIAL_VARS = ("RANK", "LOCAL_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE")
_ALONE_IS_ONE = {
    "RANK": {""},
    "LOCAL_RANK": {""},
    "GROUP_RANK": {""},
    "LOCAL_WORLD_SIZE": {"", "1"},
    "GROUP_WORLD_SIZE": {"", "1"},
}


def detect(
    env: Mapping[str, str],
    *,
    disable: Iterable[str] = (),
    force: str | None = None,
    launchers: Sequence[Launcher] = PRECEDENCE,
) -> ProcessInfo:
    """Describe this process from a launcher environment.

    Args:
        env: The environment to read, usually ``os.environ``. Never modified.
        disable: Detector names to skip (also ``DEVLAYER_DISABLE_LAUNCHERS=slurm,mpich``).
        force: Use only this detector (also ``DEVLAYER_LAUNCHER``); ``none`` = one process.
        launchers: The launchers to try, in precedence order (default :data:`PRECEDENCE`);
            e.g. ``(MY_LAUNCHER, *PRECEDENCE)`` for a launcher of one's own.

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
    table = _Table(launchers)
    force_origin = "force"
    if force is None and env.get("DEVLAYER_LAUNCHER", "").strip():
        force, force_origin = env["DEVLAYER_LAUNCHER"], "DEVLAYER_LAUNCHER"
    if force is not None and force.strip().lower() == "auto":
        force = None
    disabled = table.disabled(env, disable)
    if force is not None:
        return table.forced(env, force, force_origin)
    chosen, hand, hand_error = table.first_match(env, disabled)
    if chosen is None:
        if hand_error is not None:
            raise hand_error
        if hand is not None:
            return validate(hand)
        _refuse_partial(env)
        notes: tuple[str, ...] = ()
        if "SLURM_JOB_ID" in env and SLURM.name not in disabled:
            notes = (
                "SLURM allocation without srun (sbatch/salloc shell): running as one process; "
                "start the script with srun or torchrun for several ranks",
            )
        return _single(env, notes)
    if table.family(chosen.launcher) == "mpi":
        table.check_family_agrees(env, chosen, disabled)
        _refuse_assumed_layout(chosen)
    if hand is not None or hand_error is not None:
        _check_hand_set_agrees(env, chosen)
        chosen = replace(
            chosen, sources={**chosen.sources}, notes=(*chosen.notes, "RANK/WORLD_SIZE agree")
        )
    return validate(chosen)


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


class _Table:
    """The launchers of one :func:`detect` call by name, with their aliases resolved."""

    def __init__(self, launchers: Sequence[Launcher]) -> None:
        self.launchers = tuple(launchers)
        self.by_name = {launcher.name: launcher for launcher in self.launchers}
        self.aliases = {a: launcher.name for launcher in self.launchers for a in launcher.aliases}

    def known(self) -> str:
        return ", ".join(["none", *self.by_name])

    def family(self, name: str) -> str:
        launcher = self.by_name.get(name) or self.by_name.get(self.aliases.get(name, ""))
        return launcher.family if launcher is not None else ""

    def key(self, raw: str) -> str:
        name = raw.strip().lower()
        return self.aliases.get(name, name)

    def disabled(self, env: Mapping[str, str], disable: Iterable[str]) -> set[str]:
        """``disable`` and ``DEVLAYER_DISABLE_LAUNCHERS``, aliases resolved."""
        disabled: set[str] = set()
        for origin, names in (
            ("disable", list(disable)),
            ("DEVLAYER_DISABLE_LAUNCHERS", env.get("DEVLAYER_DISABLE_LAUNCHERS", "").split(",")),
        ):
            for raw in names:
                name = self.key(raw)
                if not name:
                    continue
                if name not in self.by_name:
                    raise LaunchEnvError(
                        f"{origin} names {raw.strip()!r}, which is not a launcher; "
                        f"known: {self.known()}"
                    )
                disabled.add(name)
        return disabled

    def forced(self, env: Mapping[str, str], force: str, origin: str) -> ProcessInfo:
        """The one detector ``force`` (or ``DEVLAYER_LAUNCHER``) names; ``none``: one process."""
        key = self.key(force)
        if key == "none":
            return _single(env, (f"{origin}=none: launcher variables ignored",))
        if key not in self.by_name:
            raise LaunchEnvError(
                f"{origin}={force!r} is not a known launcher; known: {self.known()} (or auto)"
            )
        found = self.by_name[key].detect(env)
        if found is None:
            raise LaunchEnvError(
                f"{origin}={force!r} but the environment has none of that launcher's "
                f"variables; use {origin}=auto to auto-detect"
            )
        if self.by_name[key].family == "mpi":
            _refuse_assumed_layout(found)
        return validate(found)

    def first_match(
        self, env: Mapping[str, str], disabled: set[str]
    ) -> tuple[ProcessInfo | None, ProcessInfo | None, LaunchEnvError | None]:
        """``(first matching launcher's info, hand-set env's info, hand-set env's error)``."""
        hand: ProcessInfo | None = None
        hand_error: LaunchEnvError | None = None
        for launcher in self.launchers:
            if launcher.name in disabled:
                continue
            if launcher is ENV:
                # Hand-set RANK/WORLD_SIZE are only compared with a scheduler or MPI
                # launcher below (whose values are then used); their own errors, such as a
                # missing MASTER_PORT that srun would derive, matter only when nothing else
                # matches.
                try:
                    hand = launcher.detect(env)
                except LaunchEnvError as exc:
                    hand_error = exc
                continue
            found = launcher.detect(env)
            if found is not None:
                # The first match wins; torchrun's also inside srun or mpirun.
                if launcher.family == "mpi":
                    found = _srun_launched(env, found, disabled)
                return found, hand, hand_error
        return None, hand, hand_error

    def check_family_agrees(
        self, env: Mapping[str, str], chosen: ProcessInfo, disabled: set[str]
    ) -> None:
        """Variables of two MPI families (``OMPI_*`` and ``PMI_RANK``...) must agree.

        The first family in precedence order wins; when another one's variables are also
        set (a stale export, a nested launch) and name a different rank or size, that is the
        same conflict as a hand-set ``RANK``, not a silent choice. Members marked
        ``compared=False`` (PMIx) are skipped: other launchers set their variables too.
        """
        for launcher in self.launchers:
            if launcher.family != "mpi" or not launcher.compared:
                continue
            if launcher.name == chosen.launcher or launcher.name in disabled:
                continue
            if launcher.rank_vars:
                # Raw values: a stale family's own detection may fail (no MASTER_ADDR for
                # its node count) while its rank and size still contradict the chosen one.
                # Its rank variable says it is there (its size may be another's: PMI_SIZE).
                if any(name in env for name in launcher.rank_vars):
                    _check_same_ranks(chosen, _raw_ranks(env, launcher))
                continue
            try:
                other = launcher.detect(env)
            except LaunchEnvError:
                continue  # a record that names no variables: only its detection can say
            if other is not None:
                _check_same_ranks(chosen, other)


def _raw_ranks(env: Mapping[str, str], launcher: Launcher) -> ProcessInfo:
    """The rank and size ``launcher``'s variables name, unchecked; a field not set (or not
    an integer: nothing to compare) takes no source, so it is not compared."""
    r = EnvReader(env, launcher.name)
    values: dict[str, int] = {}
    for fieldname, names in (("rank", launcher.rank_vars), ("world_size", launcher.size_vars)):
        found = r.first(names)
        if found is not None and found[1].lstrip("-").isdigit():
            values[fieldname] = int(found[1])
            r.sources[fieldname] = found[0]
    return ProcessInfo(
        rank=values.get("rank", 0),
        world_size=values.get("world_size", 1),
        launcher=launcher.name,
        sources=r.sources,
    )


def _check_same_ranks(chosen: ProcessInfo, other: ProcessInfo) -> None:
    for fieldname in ("rank", "world_size"):
        if fieldname not in other.sources:
            continue  # not set by the other family
        mine, theirs = getattr(chosen, fieldname), getattr(other, fieldname)
        if mine != theirs:
            raise LaunchEnvError(
                f"conflicting launcher variables: {chosen.sources.get(fieldname)}={mine} "
                f"({chosen.launcher}) but {other.sources.get(fieldname)}={theirs} "
                f"({other.launcher}); unset the stale ones, or set "
                f"DEVLAYER_LAUNCHER={chosen.launcher} or ={other.launcher} to choose"
            )


def _single(env: Mapping[str, str], notes: tuple[str, ...] = ()) -> ProcessInfo:
    r = EnvReader(env, "none")
    r.sources["rank"] = "single process"
    return r.info(notes=notes)


def _refuse_partial(env: Mapping[str, str]) -> None:
    """A partial torchrun-style set and no launcher: an error, never one process.

    ``WORLD_SIZE`` > 1 without ``RANK``, ``RANK`` without ``WORLD_SIZE``, or ``LOCAL_RANK``,
    ``GROUP_RANK`` (or a local or group size above 1) without both: running as world size 1
    would train alone and write checkpoints as if it were the whole job (every rank of a
    job whose launcher devlayer does not know would). ``WORLD_SIZE=1`` alone, and
    ``MASTER_ADDR``/``MASTER_PORT`` alone, still mean one process.
    """
    seen = ", ".join(f"{v}={env[v].strip()}" for v in _WORLD_VARS if env.get(v, "").strip())
    size, rank = env.get("WORLD_SIZE", "").strip(), env.get("RANK", "").strip()
    fix = (
        "start the job with its launcher (torchrun, srun, mpirun), or unset them (or set "
        "DEVLAYER_LAUNCHER=none) to run as one process"
    )
    if size and size != "1" and not rank:
        raise LaunchEnvError(
            f"WORLD_SIZE={size} but RANK is not set (seen: {seen}), and no launcher "
            f"(torchrun, srun, mpirun) says which rank this process is; export RANK=<0.."
            f"WORLD_SIZE-1> for every process, start the job with its launcher, or unset "
            f"WORLD_SIZE (or set DEVLAYER_LAUNCHER=none) to run as one process"
        )
    if rank and not size:
        raise LaunchEnvError(
            f"RANK={rank} but WORLD_SIZE is not set (seen: {seen}), so devlayer cannot tell "
            f"how many ranks the job has; export WORLD_SIZE=<ranks> (and MASTER_ADDR, "
            f"MASTER_PORT) for every process, or {fix}"
        )
    partial = [v for v in _PARTIAL_VARS if env.get(v, "").strip() not in _ALONE_IS_ONE[v]]
    if partial and not rank:
        raise LaunchEnvError(
            f"{', '.join(f'{v}={env[v].strip()}' for v in partial)} set but RANK and "
            f"WORLD_SIZE are not (seen: {seen}): a launcher's variables without the ranks, so "
            f"devlayer cannot tell which rank of how many this process is; export RANK and "
            f"WORLD_SIZE for every process, or {fix}"
        )


def _refuse_assumed_layout(info: ProcessInfo) -> None:
    """An MPI launch of several ranks that names no local ranks: an error, not one node.

    All ranks on this node with a loopback store would leave the ranks of another node
    waiting on their own loopback, and pick devices by a local rank that is the global one.
    """
    if info.world_size < 2 or info.sources.get("local_world_size") != ASSUMED:
        return
    src = info.sources
    raise LaunchEnvError(
        f"{info.launcher} launch of {src.get('world_size')}={info.world_size} ranks "
        f"({src.get('rank')}={info.rank}) names no local ranks, so devlayer cannot tell how "
        f"many run on this node, nor whether the job spans nodes; export LOCAL_WORLD_SIZE="
        f"<ranks per node> (and MASTER_ADDR across nodes) for every rank, or start the ranks "
        f"with a launcher that sets local ranks (mpiexec/mpirun, srun)"
    )


def _check_hand_set_agrees(env: Mapping[str, str], chosen: ProcessInfo) -> None:
    """A hand-set RANK, WORLD_SIZE or LOCAL_RANK must agree with the launcher that matched.

    Compare only what was really exported: when LOCAL_RANK is absent the env detector
    assumes one node, which says nothing about a multi-node srun step.
    """
    r = EnvReader(env, "env")
    hand_set = [(f, var, r.int(f, var)) for f, var in _COMPARED if r.first((var,)) is not None]
    for fieldname, var, mine in hand_set:
        theirs = getattr(chosen, fieldname)
        if mine != theirs:
            raise LaunchEnvError(
                f"conflicting launcher variables: {var}={mine} "
                f"but {chosen.sources.get(fieldname)}={theirs} ({chosen.launcher}); unset the "
                f"hand-set one, or set DEVLAYER_LAUNCHER=env or ={chosen.launcher} to choose"
            )


def _srun_launched(env: Mapping[str, str], found: ProcessInfo, disabled: set[str]) -> ProcessInfo:
    """Prefer SLURM's layout when srun itself started MPI-style ranks.

    ``srun --mpi=pmi2`` sets ``PMI_RANK``/``PMI_SIZE`` and ``srun --mpi=pmix`` sets
    ``PMIX_RANK``, but neither says how many ranks share a node, so the MPI detector would
    assume one node (loopback MASTER_ADDR, local_rank = rank). When the srun step's own
    rank and size agree, srun is the launcher and its per-node values are the right ones.
    ``mpirun`` inside an allocation always gives local ranks, so it never gets here.
    """
    if found.sources.get("local_world_size") != ASSUMED or SLURM.name in disabled:
        return found
    try:
        srun = SLURM.detect(env)
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
