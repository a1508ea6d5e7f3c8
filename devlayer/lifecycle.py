"""``init()``, ``shutdown()`` and the :class:`State` they manage (the lifecycle of a rank).

The module is not called ``state`` so that it cannot shadow the function ``devlayer.state()``.

``init()`` does, in this order (each step before anything that would freeze it):

1. check torch (>= 2.6) and the arguments;
2. read the launcher environment (:func:`devlayer.launchers.detect`);
3. choose the backend (argument > ``DEVLAYER_BACKEND`` > auto-detect) without initializing
   any vendor runtime;
4. narrow the vendor's visibility variable (``CUDA_VISIBLE_DEVICES``, ``ZE_AFFINITY_MASK``...)
   when ``devices=`` / ``DEVLAYER_DEVICES`` asks for it, or raise :class:`InitOrderError`
   when the runtime already started;
5. pick device ``local_rank % visible`` and make it current (and torch's default device);
6. export the torchrun-style variables (``RANK``, ``LOCAL_RANK``...) when the launcher
   used other names, so libraries that read them agree;
7. with several ranks: rendezvous through a TCP store (every rank checks in, so a missing
   rank is named instead of hanging) and create torch's default process group as
   ``"<device>:<comm>,cpu:gloo"`` so CPU tensors and Python objects work on accelerator runs.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devlayer import devices as _devices
from devlayer import hangdump
from devlayer.config import Settings
from devlayer.errors import (
    BackendUnavailableError,
    DeviceError,
    DevlayerError,
    InitOrderError,
    NotInitializedError,
    RendezvousError,
)
from devlayer.hooks import AcceleratorHook, as_hook_list, call_hooks, resolve_hooks, torch_module
from devlayer.launchers import ProcessInfo, detect
from devlayer.registry import BoundBackend, choose_backend, prepare_comm
from devlayer.rendezvous import leave as leave_round
from devlayer.rendezvous import rendezvous
from devlayer.torchcompat import (
    check_torch_version,
    torch_advisories,
)

if TYPE_CHECKING:
    from types import ModuleType

    import torch


__all__ = [
    "AcceleratorHook",
    "State",
    "accelerator_module",
    "backend",
    "device",
    "init",
    "is_initialized",
    "is_local_main",
    "is_main",
    "local_rank",
    "local_world_size",
    "node_rank",
    "num_nodes",
    "rank",
    "shutdown",
    "state",
    "world_size",
]

log = logging.getLogger("devlayer")

#: Marks that visibility was already narrowed in this process tree (see devlayer.devices).
APPLIED_MARKER = _devices.APPLIED_MARKER


@dataclass(frozen=True)
class State:
    """What ``init()`` set up. Also a context manager that calls :func:`shutdown`.

    Attributes:
        backend: The backend name (``cuda``, ``xpu``, ``mps``, ``cpu`` or a plugin).
        device: The torch device this rank uses.
        device_index: Its index among the visible devices (``None`` on cpu/mps).
        comm: The process-group backend (``nccl``, ``xccl``, ``ccl``, ``gloo``, ``mpi``), or
            ``None`` at world size 1, where no process group is created.
        process: The launcher's view (rank, world size, local rank, sources...).
        timeout: Collective and rendezvous timeout.
        visibility: The visibility variable devlayer set and its value, if any.
        reason: Why this backend was chosen.
        owns_process_group: False when the process group existed before ``init()``.
        settings: The ``DEVLAYER_*`` settings init() read, with the arguments in place of
            their variables (each with its origin).

    Example:
        >>> import devlayer
        >>> with devlayer.init(backend="cpu") as st:
        ...     (st.rank, st.world_size, str(st.device))
        (0, 1, 'cpu')
    """

    backend: str
    device: torch.device
    device_index: int | None
    comm: str | None
    process: ProcessInfo
    timeout: timedelta
    visibility: tuple[str, str] | None = None
    reason: str = ""
    owns_process_group: bool = False
    settings: Settings = field(default_factory=Settings, repr=False, compare=False)
    _key: Any = field(default=None, repr=False, compare=False)

    @property
    def rank(self) -> int:
        """Global rank."""
        return self.process.rank

    @property
    def world_size(self) -> int:
        """Number of ranks."""
        return self.process.world_size

    @property
    def local_rank(self) -> int:
        """Rank on this node."""
        return self.process.local_rank

    @property
    def local_world_size(self) -> int:
        """Ranks on this node."""
        return self.process.local_world_size

    @property
    def node_rank(self) -> int:
        """Index of this node."""
        return self.process.node_rank

    @property
    def num_nodes(self) -> int:
        """Number of nodes (machines) in the job."""
        return self.process.num_nodes

    @property
    def is_main(self) -> bool:
        """True on global rank 0."""
        return self.process.rank == 0

    @property
    def is_local_main(self) -> bool:
        """True on local rank 0 of each node."""
        return self.process.local_rank == 0

    def __enter__(self) -> State:
        return self

    def __exit__(self, *exc: Any) -> None:
        if _current is self:
            hangdump.mark_failed(exc[0], exc[1])  # before shutdown() says this rank left
            shutdown()


@dataclass
class _Undo:
    """What init changed outside itself, so shutdown can put it back (and the rendezvous
    store of the round it joined, which shutdown marks as left)."""

    env: dict[str, str | None] = field(default_factory=dict)
    default_device_set: bool = False
    store: Any = None

    def setenv(self, name: str, value: str) -> None:
        if name not in self.env:
            self.env[name] = os.environ.get(name)
        os.environ[name] = value


_lock = threading.RLock()
_current: State | None = None
_undo = _Undo()


# --------------------------------------------------------------------------- validation


# --------------------------------------------------------------------------- init


def init(
    backend: str | None = None,
    devices: object = None,
    timeout: float | timedelta | None = None,
    *,
    comm: str | None = None,
    set_default_device: bool | None = None,
    accelerator_hooks: Iterable[AcceleratorHook] | None = None,
    hang_dir: str | os.PathLike[str] | None = None,
) -> State:
    """Set up this process: backend, device, and (with several ranks) the process group.

    Safe to call in every script: with no launcher it is a single process with no process
    group. Calling it again with the same request returns the same :class:`State`; requests
    are compared after resolving the ``DEVLAYER_*`` variables and normalising (``"1,3"`` =
    ``[1, 3]``, ``30`` = ``timedelta(seconds=30)``, ``comm=None`` = the backend's own).

    Args:
        backend: ``"cuda"``, ``"xpu"``, ``"mps"``, ``"cpu"``, a plugin name, or ``None``/
            ``"auto"`` for ``DEVLAYER_BACKEND`` or auto-detection.
        devices: Which visible devices to use: ``"auto"``, a count, ``"1,3"`` or ``[1, 3]``
            (default: ``DEVLAYER_DEVICES`` or all). Applied through the vendor's visibility
            variable before the runtime starts.
        timeout: Seconds (or a timedelta) for rendezvous and collectives (default:
            ``DEVLAYER_TIMEOUT`` or 600).
        comm: Process-group backend override (``"gloo"``, ``"mpi"``, ``"ccl"``...; default:
            ``DEVLAYER_COMM`` or the backend's own). Never switched silently; one this torch
            build lacks is an error at every world size, even 1.
        set_default_device: Make the device torch's default for new tensors
            (``torch.set_default_device``). Default: on for accelerators, off on cpu;
            ``DEVLAYER_SET_DEFAULT_DEVICE=0`` opts out.
        accelerator_hooks: Callables called once as ``hook(module)`` with torch's module
            for the selected device type (``torch.cuda``, ``torch.xpu``, ``torch.mps``,
            ``torch.cpu``), for libraries that keep one, e.g.
            ``[ptychi.device.set_torch_accelerator_module]``; ``"package.module:function"``
            strings name a hook without importing it yourself. Default:
            ``DEVLAYER_ACCELERATOR_HOOKS`` (comma-separated ``module:function``) or none;
            ``()`` opts out of the variable.
        hang_dir: The folder for hang dumps (default: ``DEVLAYER_HANG_DIR`` or a folder
            per job under the system's temp folder; the messages name it). Each rank
            writes ``rank<N>.json`` there when a collective times out, on SIGTERM,
            SIGINT or SIGUSR1, and from the watchdog; ``devlayer hangs DIR`` reads them.

    Returns:
        The :class:`State`, also available as :func:`devlayer.state`.

    Raises:
        BackendNotFoundError: Unknown backend name.
        BackendUnavailableError: The chosen backend or comm cannot run here.
        DeviceError: Devices that do not exist or cannot be shared.
        InitOrderError: The vendor runtime started before visibility could be set.
        LaunchEnvError: Inconsistent launcher variables.
        RendezvousError: Ranks could not meet within the timeout.
        DevlayerError: Called again with different arguments, or torch is too old.

    Example:
        >>> import devlayer
        >>> st = devlayer.init(backend="cpu")
        >>> devlayer.world_size(), devlayer.device().type
        (1, 'cpu')
        >>> devlayer.shutdown()
        True
    """
    # Long only by its docstring, the argument reference users read; each step is a helper.
    global _current
    request = _Request.of(
        _settings(backend, devices, timeout, comm, set_default_device, accelerator_hooks).given(
            "hang_dir", hang_dir
        )
    )
    settings = request.settings
    with _lock:
        if _current is not None:
            return _same_state(request)
        check_torch_version()
        _warn_advisories()
        hooks = resolve_hooks(request.hooks, settings.origin("accelerator_hooks"))

        info = detect(os.environ)
        selection = choose_backend(settings.backend, settings.origin("backend"))
        be = selection.backend
        comm_name = _comm_name(be, request, info)
        plan = _plan_devices(be, request.devices, request.origin, info)
        if request.origin == "DEVLAYER_DEVICES":
            _warn_count_or_index(be, plan, info)

        undo = _Undo()
        try:
            visibility = _apply_visibility(be, plan, undo)
            index = _pick_device(be, plan, info, comm_name, settings.allow_shared_devices)
            dev = _bind_device(be, index, request.set_default_device, undo)
            call_hooks(hooks, be)
            hangs = _hang_folder(settings, info)
            owns, store = _connect(be, comm_name, dev, info, request.timeout, undo, hangs)
        except BaseException:
            _restore(undo)
            raise
        _undo.env, _undo.default_device_set = undo.env, undo.default_device_set
        _undo.store = store
        _current = State(
            backend=be.name,
            device=dev,
            device_index=index,
            comm=comm_name,
            process=info,
            timeout=request.timeout,
            visibility=visibility,
            reason=selection.reason,
            owns_process_group=owns,
            settings=settings,
            _key=_made(request, be, comm_name),
        )
        _start_hang_reports(_current, store)
        log.debug("devlayer initialized: %s", _current)
        return _current


def _hang_folder(settings: Settings, info: ProcessInfo) -> Path | None:
    """The hang dumps' folder, or None when there are none (turned off, or one rank)."""
    if not settings.hang_reports or info.world_size < 2:
        return None
    facts = {"launcher": info.launcher, "job_id": info.job_id, "port": info.master_port}
    return hangdump.folder_for(settings.hang_dir, facts)


def _start_hang_reports(st: State, store: Any) -> None:
    """The hang dumps, signal handlers and watchdog of this State (devlayer.hangdump)."""
    info, settings = st.process, st.settings
    facts = {
        "rank": info.rank,
        "world_size": info.world_size,
        "local_rank": info.local_rank,
        "node_rank": info.node_rank,
        "host": socket.gethostname(),
        "backend": st.backend,
        "comm": st.comm,
        "device": str(st.device),
        "launcher": info.launcher,
        "job": info.job_identity,
        "job_id": info.job_id,
        "port": info.master_port,
    }
    hangdump.start(
        facts,
        folder=settings.hang_dir,
        enabled=settings.hang_reports,
        timeout=st.timeout.total_seconds(),
        watchdog=settings.watchdog,
        store=store,
        # torchrun's agent stops every worker when one fails (and restarts them when
        # elastic); its store outlives the workers: the survivor watch has nothing to add.
        peer_watch=settings.peer_watch and not info.agent_supervised,
    )


def _settings(
    backend: object,
    devices: object,
    timeout: object,
    comm: object,
    set_default_device: bool | None,
    accelerator_hooks: Iterable[AcceleratorHook] | None,
) -> Settings:
    """The one read of the environment for an ``init()`` call; arguments win over it."""
    return (
        Settings.from_env(os.environ)
        .given("backend", backend)
        .given("devices", devices)
        .given("timeout", timeout)
        .given("comm", comm)
        .given("set_default_device", set_default_device)
        .given("accelerator_hooks", as_hook_list(accelerator_hooks))
    )


@dataclass(frozen=True)
class _Request:
    """What one ``init()`` call asks for: its :class:`Settings`, normalised, as one key.

    Arguments win over their DEVLAYER_* variables, and both are normalised by the same code
    (:meth:`Settings.given`): ``"1,3"`` and ``[1, 3]`` are one device spec, ``30`` and
    ``timedelta(seconds=30)`` one timeout, ``"GLOO"`` and ``"gloo"`` one comm,
    ``DEVLAYER_SET_DEFAULT_DEVICE=0`` and ``set_default_device=False`` one choice, so the
    same request given two ways is the same request (a second ``init()`` returns the State
    instead of refusing). init() does the work from these fields too.
    """

    backend: str
    devices: _devices.DeviceSpec
    timeout: timedelta
    comm: str | None
    set_default_device: bool | None
    hooks: tuple[AcceleratorHook, ...]
    hang_dir: str | None = None
    origin: str = field(default="devices", compare=False)
    comm_origin: str = field(default="comm", compare=False)
    #: The backend's own comm, which ``comm=None`` means (set once init() chose a backend).
    default_comm: str | None = field(default=None, compare=False)
    #: The settings it was made from (their origins, and what the key leaves out).
    settings: Settings = field(default_factory=Settings, compare=False, repr=False)

    @classmethod
    def of(cls, settings: Settings) -> _Request:
        """The request ``settings`` make (a backend name in lower case, ``"auto"`` for none)."""
        name = settings.backend
        # A name that is not a string stays visible here; choose_backend() refuses it by name.
        shown = name.lower() if isinstance(name, str) else repr(name)
        return cls(
            backend="auto" if name is None else shown,
            devices=settings.devices,
            timeout=settings.timeout,
            comm=settings.comm,
            set_default_device=settings.set_default_device,
            hooks=settings.accelerator_hooks,
            hang_dir=settings.hang_dir,
            origin=settings.origin("devices"),
            comm_origin=settings.origin("comm"),
            settings=settings,
        )

    def describe(self) -> str:
        """The request as a user would write it, for messages."""
        seconds = self.timeout.total_seconds()
        parts = [
            f"backend={self.backend!r}",
            f"devices={_show(self.devices)}",
            f"timeout={seconds:g}",
            f"comm={self.comm!r}",
        ]
        if self.set_default_device is not None:
            parts.append(f"set_default_device={self.set_default_device!r}")
        if self.hooks:
            parts.append(f"accelerator_hooks={list(self.hooks)!r}")
        if self.hang_dir is not None:
            parts.append(f"hang_dir={self.hang_dir!r}")
        return ", ".join(parts)


def _made(request: _Request, be: BoundBackend, comm_name: str | None) -> _Request:
    """The request as init() carried it out: ``comm=None`` filled in with the backend's own."""
    default = _default_comm(be)
    return replace(request, comm=comm_name or request.comm or default, default_comm=default)


def _default_comm(be: BoundBackend) -> str | None:
    try:
        return be.default_comm().lower()
    except Exception:  # a plugin whose default cannot be asked here; only None matches None
        return None


def _same_state(request: _Request) -> State:
    """The current State when ``request`` matches the call that made it; else an error."""
    assert _current is not None  # the caller holds the lock and checked
    made: _Request = _current._key
    request = replace(request, comm=request.comm or made.default_comm)
    if request == made:
        return _current
    raise DevlayerError(
        f"devlayer.init() was already called with {made.describe()}; now called with "
        f"{request.describe()}. Call devlayer.shutdown() first to change the set-up"
    )


def _comm_name(be: BoundBackend, request: _Request, info: ProcessInfo) -> str | None:
    """The process-group backend, or ``None`` at world size 1 (no process group).

    A comm that was asked for is checked at every world size: ``comm="nccl"`` on a machine
    without it is the same error at world size 1 as at 2.
    """
    if info.world_size > 1 and not be.multi_process:
        raise DeviceError(
            f"backend {be.name!r} runs a single process, but the launcher started "
            f"{info.world_size} ranks ({info.launcher}); launch one process, or use "
            f"DEVLAYER_BACKEND=cpu for multi-process runs"
        )
    comm = request.comm
    if comm is not None and not be.comm_available(comm):
        available = ", ".join(repr(c) for c in _available_comms(be)) or "none"
        raise BackendUnavailableError(
            f"communication backend {comm!r} is not available for backend {be.name!r} in "
            f"this torch build (asked for by {request.comm_origin}={comm!r}; available: "
            f"{available}); {be.hint(comm)}"
        )
    return be.comm_backend(comm) if info.world_size > 1 else None


def _available_comms(be: BoundBackend) -> list[str]:
    """The process-group backends torch knows that ``be`` could use here."""
    import torch.distributed as dist

    known = [c for c in dist.Backend.backend_list if c not in ("undefined", "fake")]
    default = _default_comm(be)
    if default is not None and default not in known:
        known.append(default)
    return [c for c in known if be.comm_available(c)]


def _plan_devices(
    be: BoundBackend, spec: _devices.DeviceSpec, origin: str, info: ProcessInfo
) -> _devices.DevicePlan:
    """The backend's facts for :func:`devlayer.devices.plan_devices`, asked once."""
    return _devices.plan_devices(
        spec,
        origin=origin,
        device_type=be.device_type,
        visible=be.device_count(),
        variable=be.visibility_var(os.environ),
        env=os.environ,
        local_rank=info.local_rank,
        local_world_size=info.local_world_size,
        indexed=be.indexed,
        launched=info.launcher != "none",
    )


def _bind_device(
    be: BoundBackend, index: int | None, set_default_device: bool | None, undo: _Undo
) -> torch.device:
    """Make device ``index`` current (and torch's default device, where asked)."""
    dev = be.device(index)
    if index is not None:
        be.set_device(index)
    want_default = set_default_device
    if want_default is None:  # neither the argument nor DEVLAYER_SET_DEFAULT_DEVICE says
        want_default = be.device_type != "cpu"
    if want_default and be.device_type != "cpu" and not _simulated(be):
        import torch

        torch.set_default_device(dev)
        undo.default_device_set = True
    return dev


def _connect(
    be: BoundBackend,
    comm_name: str | None,
    dev: torch.device,
    info: ProcessInfo,
    timeout: timedelta,
    undo: _Undo,
    hangs: Path | None = None,
) -> tuple[bool, Any]:
    """Export the variables peers and libraries read; with several ranks, join the group
    (torch's flight recorder, where the comm has one, armed for the hang folder ``hangs``).

    Returns:
        Whether devlayer created the process group (and so destroys it at shutdown), and
        the rendezvous store it made (None when it made none).
    """
    for name, value in _interop_env(be, info).items():
        if name not in os.environ:
            undo.setenv(name, value)
    if comm_name is None:
        return False, None
    prepare_comm(be, comm_name, info, undo.setenv)
    if hangs is not None:
        hangdump.arm_flight_recorder(comm_name, hangs, os.environ, undo.setenv)
    return _create_process_group(be, comm_name, dev, info, timeout)


_advisories_warned = False


def _warn_advisories() -> None:
    global _advisories_warned
    if _advisories_warned:
        return
    _advisories_warned = True
    import warnings

    import torch

    for advisory in torch_advisories(torch.__version__):
        warnings.warn(
            f"torch {torch.__version__} has a published advisory: {advisory}", stacklevel=3
        )


def accelerator_module() -> ModuleType:
    """torch's module for this rank's device type: ``torch.cuda``, ``torch.xpu``, ``torch.cpu``...

    For code that calls ``synchronize()``, ``empty_cache()`` or ``memory_allocated()``
    without naming a vendor (ROCm builds answer as ``torch.cuda``). Requires :func:`init`.

    Example:
        >>> import devlayer
        >>> _ = devlayer.init(backend="cpu")
        >>> devlayer.accelerator_module().__name__
        'torch.cpu'
        >>> _ = devlayer.shutdown()
    """
    return torch_module(state().device.type)


def _interop_env(be: BoundBackend, info: ProcessInfo) -> dict[str, str]:
    """Variables that make other libraries agree with devlayer (only set when unset).

    * SLURM/MPI ranks get torchrun's names (``RANK``, ``LOCAL_RANK``...), which most
      libraries read.
    * Multi-process CPU runs get ``ACCELERATE_USE_CPU=true``: otherwise an
      ``accelerate.Accelerator`` created later sees no GPU and reports one process.
    """
    env: dict[str, str] = {}
    if info.launcher != "none":
        env.update(info.torch_env())
    if be.device_type == "cpu" and info.world_size > 1:
        env["ACCELERATE_USE_CPU"] = "true"
    return env


def _simulated(be: BoundBackend) -> bool:
    return bool(getattr(be.runtime, "simulated", False))


_count_warned = False


def _warn_count_or_index(be: BoundBackend, plan: _devices.DevicePlan, info: ProcessInfo) -> None:
    """Warn once when ``DEVLAYER_DEVICES=N`` could also be read as the index N.

    ``DEVLAYER_DEVICES=1`` is a count (device 0), as in Lightning; someone translating
    ``CUDA_VISIBLE_DEVICES=1`` means device 1. Only when device N exists are both readings
    possible; ``N,`` / ``[N]`` (an index) and ``0,1`` (indices) say which one is meant.
    """
    global _count_warned
    spec = plan.spec
    if _count_warned or not isinstance(spec, int) or info.local_rank != 0:
        return
    var = be.visibility_var(os.environ) if be.indexed else None
    if var is None:
        return
    if spec >= plan.visible:  # no device N: the count is the only reading
        return
    _count_warned = True
    import warnings

    first = "device 0" if spec == 1 else f"devices 0..{spec - 1}"
    listed = ",".join(map(str, range(spec))) + ("," if spec == 1 else "")
    warnings.warn(
        f"DEVLAYER_DEVICES={spec} is read as a count: the first {spec} visible "
        f"{be.device_type} device(s) ({first}), not the device with index {spec} (as "
        f"{var}={spec} would mean). For the index write "
        f"DEVLAYER_DEVICES={spec}, (or [{spec}]); to keep the count without this warning "
        f"write the indices, DEVLAYER_DEVICES={listed}",
        UserWarning,
        stacklevel=3,
    )


def _apply_visibility(
    be: BoundBackend, plan: _devices.DevicePlan, undo: _Undo
) -> tuple[str, str] | None:
    """Narrow the vendor's visibility variable as planned, before its runtime starts."""
    var, new_value = plan.variable, plan.value
    if var is None or new_value is None or plan.marker is None or plan.indices is None:
        return plan.visibility(os.environ)  # nothing to change (or a parent changed it)
    if be.runtime.is_initialized():
        if os.environ.get(var) == new_value:
            return (var, new_value)
        raise InitOrderError(
            f"the {be.name} runtime was initialized before devlayer.init() could set "
            f"{var}={new_value!r} (from {plan.origin}={_show(plan.spec)}); the runtime reads "
            f"{var} only once, at its start. Something called into torch.{be.device_type} first "
            f"(e.g. torch.{be.device_type}.is_available(), .to('{be.device_type}'), or a "
            f"library import). Fix: call devlayer.init() before that, put `import "
            f"devlayer.early` at the very top of the script with DEVLAYER_DEVICES set, or "
            f"export {var} before starting Python"
        )
    undo.setenv(var, new_value)
    undo.setenv(APPLIED_MARKER, plan.marker)
    seen = be.device_count()
    if seen < len(plan.indices):
        raise DeviceError(
            f"{plan.origin}={_show(plan.spec)}: after setting {var}={new_value!r} the {be.name} "
            f"runtime sees {seen} device(s), expected {len(plan.indices)}; check the indices "
            f"with `devlayer info`"
        )
    return (var, new_value)


_show = _devices.show_spec


def _pick_device(
    be: BoundBackend,
    plan: _devices.DevicePlan,
    info: ProcessInfo,
    comm: str | None = None,
    allow_shared: bool = False,
) -> int | None:
    """The index this rank binds among the devices it sees after visibility was applied."""
    if not be.indexed:
        return None
    count = be.device_count()
    if count < 1:
        raise DeviceError(
            f"backend {be.name!r} sees no devices after visibility was applied "
            f"({', '.join(f'{v}={os.environ.get(v)!r}' for v in be.visibility_vars)}); "
            f"check the visibility variables with `devlayer info`"
        )
    if count < info.local_world_size and not _bound_per_task(be, count):
        _check_shared_devices(be, comm, count, info, allow_shared)
    return plan.device_index(count)


def _bound_per_task(be: BoundBackend, count: int) -> bool:
    """One visible device that a scheduler chose for this task alone.

    ``srun --gpus-per-task=1`` (or a wrapper script) gives each rank its own device as
    device 0 through the visibility variable: that is one device per rank, not sharing. With
    the variable unset, or narrowed by devlayer itself (the same value for every rank), one
    visible device is the node's only device, and the ranks share it.
    """
    var = be.visibility_var(os.environ)
    if count != 1 or var is None or not os.environ.get(var, "").strip():
        return False
    return not any(entry.startswith(f"{var}=") for entry in _devices.applied_entries(os.environ))


_shared_warned = False


def _check_shared_devices(
    be: BoundBackend, comm: str | None, count: int, info: ProcessInfo, allow: bool
) -> None:
    """More ranks on this node than devices: an error where the comm refuses, else a warning.

    ``allow`` (``DEVLAYER_ALLOW_SHARED_DEVICES``) turns the error into the warning.

    One visible device that a scheduler bound to this task is left alone (see
    :func:`_bound_per_task`): there every rank sees a different device as device 0.
    """
    global _shared_warned
    ranks = info.local_world_size
    shown = min(ranks, 6)
    mapping = ", ".join(
        f"{be.device_type}:{_devices.device_index(r, count)}" for r in range(shown)
    ) + (", ..." if ranks > shown else "")
    what = (
        f"{ranks} ranks run on this node but {count} {be.device_type} device(s) are visible, "
        f"so ranks share devices (local rank -> device: {mapping})"
    )
    if comm is not None and not be.shares_devices_between_ranks(comm) and not allow:
        raise DeviceError(
            f"{what}; the {comm!r} communication backend refuses two ranks on one device in "
            f"most versions. Start at most {count} ranks per node or make more devices "
            f"visible; set DEVLAYER_ALLOW_SHARED_DEVICES=1 to try anyway"
        )
    if info.rank == 0 and not _shared_warned:
        _shared_warned = True
        log.warning("%s; sharing a device between ranks is discouraged (slow, memory)", what)


def _create_process_group(
    be: BoundBackend, comm: str, dev: torch.device, info: ProcessInfo, timeout: timedelta
) -> tuple[bool, Any]:
    import torch.distributed as dist

    if dist.is_initialized():
        world, rank_ = dist.get_world_size(), dist.get_rank()
        if (world, rank_) != (info.world_size, info.rank):
            raise DevlayerError(
                f"a torch.distributed process group already exists with rank={rank_}, "
                f"world_size={world}, but the launcher says rank={info.rank}, "
                f"world_size={info.world_size}; destroy it or let devlayer.init() create it"
            )
        _guard_exit()  # an adopted gloo group aborts at exit after DDP just the same
        return False, None
    if be.device_type == "cpu":
        pg_backend = comm
    elif comm == "gloo":
        pg_backend = f"{be.device_type}:gloo,cpu:gloo"
    else:
        pg_backend = f"{be.device_type}:{comm},cpu:gloo"
    store = rendezvous(info, timeout)
    kwargs: dict[str, Any] = {}
    if be.bind_device_id and dev.index is not None and not _simulated(be):
        kwargs["device_id"] = dev
    try:
        dist.init_process_group(
            backend=pg_backend,
            store=store,
            rank=info.rank,
            world_size=info.world_size,
            timeout=timeout,
            **kwargs,
        )
    except Exception as exc:
        leave_round(store)  # this rank is out of the round: an init() again must not meet it
        raise RendezvousError(
            f"creating the {pg_backend!r} process group failed on rank {info.rank} of "
            f"{info.world_size} ({info.master_addr}:{info.master_port}): {exc}"
        ) from exc
    _guard_exit()
    return True, store


_exit_guarded = False


def _guard_exit() -> None:
    """Register :func:`_let_workers_finish` to run at exit (once per process)."""
    global _exit_guarded
    if not _exit_guarded:
        _exit_guarded = True
        atexit.register(_let_workers_finish)


def _let_workers_finish() -> None:
    """Release the GIL for a moment before the interpreter finalizes.

    A gloo worker thread destroys a finished collective's work after the caller returned,
    which needs the GIL. If the interpreter is already finalizing, that thread is killed
    and ``std::terminate`` aborts the process (SIGABRT, "terminate called without an active
    exception") after a successful run, so torchrun reports a failure. DDP keeps the group
    alive past ``destroy_process_group()``, so ``shutdown()`` alone does not prevent it;
    seen in about 1 of 3 two-rank Trainer runs under torchrun here. Upstream:
    pytorch/pytorch PR 179291 (abandoned).
    """
    time.sleep(0.05)


# --------------------------------------------------------------------------- rendezvous


# --------------------------------------------------------------------------- shutdown


def _restore(undo: _Undo) -> None:
    for name, value in undo.env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    undo.env.clear()
    if undo.default_device_set:
        import torch

        torch.set_default_device(None)
        undo.default_device_set = False


def shutdown() -> bool:
    """Destroy the process group devlayer created and forget the state.

    Environment variables that ``init()`` set are put back. Safe to call when nothing is
    initialized.

    Returns:
        True if something was shut down, False if devlayer was not initialized.
    """
    global _current
    with _lock:
        if _current is None:
            return False
        st, _current = _current, None
        store, _undo.store = _undo.store, None
        if store is not None:  # before anything else: this rank may init() again at once
            leave_round(store)
        del store  # rank 0's reference would keep its store serving past the group
        hangdump.stop()
        try:
            if st.owns_process_group:
                import torch.distributed as dist

                if dist.is_initialized():
                    dist.destroy_process_group()
        finally:
            _restore(_undo)
    return True


# --------------------------------------------------------------------------- accessors


def is_initialized() -> bool:
    """True between ``init()`` and ``shutdown()``."""
    return _current is not None


def state() -> State:
    """The current :class:`State`.

    Raises:
        NotInitializedError: Before ``devlayer.init()``.
    """
    st = _current
    if st is None:
        raise NotInitializedError(
            "devlayer is not initialized; call devlayer.init() first (it is cheap at world "
            "size 1 and reads the launcher's environment)"
        )
    return st


def rank() -> int:
    """Global rank of this process."""
    return state().process.rank


def world_size() -> int:
    """Number of processes in the job."""
    return state().process.world_size


def local_rank() -> int:
    """Rank of this process on its node."""
    return state().process.local_rank


def local_world_size() -> int:
    """Number of processes on this node."""
    return state().process.local_world_size


def node_rank() -> int:
    """Index of this node."""
    return state().process.node_rank


def num_nodes() -> int:
    """Number of nodes in the job, e.g. for printing ``nodes x devices per node``.

    Example:
        >>> import devlayer
        >>> with devlayer.init(backend="cpu"):
        ...     f"{devlayer.num_nodes()} x {devlayer.local_world_size()}"
        '1 x 1'
    """
    return state().process.num_nodes


def is_main() -> bool:
    """True on global rank 0."""
    return state().process.rank == 0


def is_local_main() -> bool:
    """True on local rank 0."""
    return state().process.local_rank == 0


def device() -> torch.device:
    """The torch device of this rank (e.g. ``cuda:1``, ``xpu:0``, ``cpu``)."""
    return state().device


def backend() -> str:
    """Name of the backend in use."""
    return state().backend
