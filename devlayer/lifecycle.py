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
import errno
import importlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from devlayer import devices as _devices
from devlayer.errors import (
    DeviceError,
    DevlayerError,
    InitOrderError,
    InvalidArgumentError,
    NotInitializedError,
    RendezvousError,
)
from devlayer.launchers import ProcessInfo, detect
from devlayer.registry import Backend, select_backend

if TYPE_CHECKING:
    from types import ModuleType

    import torch

#: ``hook(module)`` for libraries that keep their own "accelerator module" (torch.cuda,
#: torch.xpu...), or ``"package.module:function"`` naming one.
AcceleratorHook = Callable[[Any], object] | str

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

MIN_TORCH = (2, 6)
DEFAULT_TIMEOUT = timedelta(minutes=10)
#: The longest rendezvous/collective timeout accepted (``timeout=``, ``DEVLAYER_TIMEOUT``).
MAX_TIMEOUT = timedelta(days=7)
#: Marks that visibility was already narrowed in this process tree (by devlayer.early or a
#: parent), so a child does not narrow relative indices twice.
APPLIED_MARKER = "DEVLAYER_VISIBILITY_APPLIED"


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
    _key: tuple[Any, ...] = field(default=(), repr=False, compare=False)

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

    def __exit__(self, *exc: object) -> None:
        if _current is self:
            shutdown()


@dataclass
class _Undo:
    """What init changed outside itself, so shutdown can put it back."""

    env: dict[str, str | None] = field(default_factory=dict)
    default_device_set: bool = False

    def setenv(self, name: str, value: str) -> None:
        if name not in self.env:
            self.env[name] = os.environ.get(name)
        os.environ[name] = value


_lock = threading.RLock()
_current: State | None = None
_undo = _Undo()


# --------------------------------------------------------------------------- validation


def check_torch_version(version: str | None = None) -> None:
    """Refuse torch older than 2.6, whose ``torch.load`` is unsafe by default.

    Raises:
        DevlayerError: Naming the version found and the fix.
    """
    from packaging.version import Version

    if version is None:
        import torch

        version = torch.__version__
    release = Version(version).release
    if tuple(release[:2]) < MIN_TORCH:
        raise DevlayerError(
            f"torch {version} is too old: devlayer needs torch >= 2.6, where torch.load defaults "
            f"to weights_only=True (older releases can run code from checkpoint files); "
            f"upgrade with `pip install 'torch>=2.6'`"
        )


#: Published advisories for torch releases devlayer still accepts (>= 2.6), as
#: (first affected, first fixed, id, what). README "Security and trust" lists the same.
#: torch < 2.6 is refused outright (CVE-2025-32434: code execution through torch.load even
#: with weights_only=True).
TORCH_ADVISORIES = (
    ("2.6.0", "2.7.0", "CVE-2025-3730", "denial of service in ctc_loss"),
    ("0", "2.9.1", "CVE-2025-2999", "memory corruption in unpack_sequence"),
    ("0", "2.10.0", "CVE-2025-3001", "memory corruption in lstm_cell"),
)


def torch_advisories(version: str) -> list[str]:
    """Known advisories that apply to torch ``version`` (one sentence each).

    Example:
        >>> torch_advisories("2.13.0")
        []
        >>> [a.split(":")[0] for a in torch_advisories("2.8.0")]
        ['CVE-2025-2999', 'CVE-2025-3001']
    """
    from packaging.version import Version

    v = Version(Version(version).base_version)
    return [
        f"{cve}: {what} (torch {first}..<{fixed}); upgrade to torch >= {fixed}"
        for first, fixed, cve, what in TORCH_ADVISORIES
        if Version(first) <= v < Version(fixed)
    ]


def parse_timeout(timeout: object, *, origin: str = "timeout") -> timedelta | None:
    """Seconds (int/float), a :class:`~datetime.timedelta` or ``None`` -> timedelta or None.

    Accepted: more than zero and at most :data:`MAX_TIMEOUT` (a week). Larger values are
    refused by name instead of overflowing inside ``timedelta`` or torch (``1e14`` raised a
    raw ``OverflowError``; ``8e13`` was accepted and then failed at once).

    Raises:
        InvalidArgumentError: Zero (or below a microsecond), negative, not finite, more than
            a week, or another type.

    Example:
        >>> parse_timeout(5)
        datetime.timedelta(seconds=5)
    """
    if timeout is None:
        return None
    shown = _short_repr(timeout)  # what the user wrote (a variable's text stays text)
    if isinstance(timeout, str) and origin != "timeout":
        try:
            timeout = float(timeout)
        except ValueError:
            raise InvalidArgumentError(
                f"{origin}={shown} is not a number of seconds; use e.g. {origin}=300"
            ) from None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float, timedelta)):
        raise InvalidArgumentError(
            f"{origin}={shown} has type {type(timeout).__name__}; pass seconds as a number "
            f"or a datetime.timedelta"
        )
    if isinstance(timeout, timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, int) and abs(timeout) > 10**15:  # float() may overflow
        seconds = float(10**15 if timeout > 0 else -1)
    else:
        seconds = float(timeout)
    if not seconds > 0 or seconds == float("inf"):
        raise InvalidArgumentError(
            f"{origin}={shown} must be a positive, finite number of seconds (e.g. 300)"
        )
    limit = MAX_TIMEOUT.total_seconds()
    if seconds > limit:
        raise InvalidArgumentError(
            f"{origin}={shown} is more than a week; devlayer accepts timeouts up to "
            f"{limit:.0f} seconds (7 days). Use a smaller value, e.g. {origin}=3600"
        )
    result = timeout if isinstance(timeout, timedelta) else timedelta(seconds=seconds)
    if result <= timedelta(0):
        raise InvalidArgumentError(
            f"{origin}={shown} must be a positive number of seconds; it rounds to 0 at "
            f"microsecond resolution (e.g. use 300)"
        )
    return result


def _short_repr(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


def _env_flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise InvalidArgumentError(f"{name}={raw!r} is not a boolean; use 1 or 0")


# --------------------------------------------------------------------------- init


def init(
    backend: str | None = None,
    devices: object = None,
    timeout: float | timedelta | None = None,
    *,
    comm: str | None = None,
    set_default_device: bool | None = None,
    accelerator_hooks: Iterable[AcceleratorHook] | None = None,
) -> State:
    """Set up this process: backend, device, and (with several ranks) the process group.

    Safe to call in every script: with no launcher it is a single process with no process
    group. Calling it again with the same arguments returns the same :class:`State`.

    Args:
        backend: ``"cuda"``, ``"xpu"``, ``"mps"``, ``"cpu"``, a plugin name, or ``None``/
            ``"auto"`` for ``DEVLAYER_BACKEND`` or auto-detection.
        devices: Which visible devices to use: ``"auto"``, a count, ``"1,3"`` or ``[1, 3]``
            (default: ``DEVLAYER_DEVICES`` or all). Applied through the vendor's visibility
            variable before the runtime starts.
        timeout: Seconds (or a timedelta) for rendezvous and collectives (default:
            ``DEVLAYER_TIMEOUT`` or 600).
        comm: Process-group backend override (``"gloo"``, ``"mpi"``, ``"ccl"``...; default:
            ``DEVLAYER_COMM`` or the backend's own). Never switched silently.
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
    global _current
    hook_list = _hook_list(accelerator_hooks)
    # The key includes the DEVLAYER_* variables init() reads, so a changed environment is
    # not silently answered with the old State.
    key = (
        backend,
        _freeze(devices),
        timeout,
        comm,
        set_default_device,
        None if hook_list is None else tuple(hook_list),
        *(os.environ.get(v) for v in _KEY_ENV),
    )
    with _lock:
        if _current is not None:
            if _current._key == key:
                return _current
            raise DevlayerError(
                f"devlayer.init() was already called with {_describe_key(_current._key)}; now "
                f"called with {_describe_key(key)}. Call devlayer.shutdown() first to change "
                f"the set-up"
            )
        check_torch_version()
        _warn_advisories()
        tmo = (
            parse_timeout(timeout)
            or parse_timeout(os.environ.get("DEVLAYER_TIMEOUT"), origin="DEVLAYER_TIMEOUT")
            or DEFAULT_TIMEOUT
        )
        if devices is None and os.environ.get("DEVLAYER_DEVICES", "").strip():
            spec = _devices.parse_devices(os.environ["DEVLAYER_DEVICES"], origin="DEVLAYER_DEVICES")
            spec_origin = "DEVLAYER_DEVICES"
        else:
            spec = _devices.parse_devices(devices)
            spec_origin = "devices"
        comm = comm or os.environ.get("DEVLAYER_COMM", "").strip() or None
        hooks = resolve_hooks(hook_list, os.environ)

        info = detect(os.environ)
        selection = select_backend(backend)
        be = selection.backend
        if info.world_size > 1 and not be.multi_process:
            raise DeviceError(
                f"backend {be.name!r} runs a single process, but the launcher started "
                f"{info.world_size} ranks ({info.launcher}); launch one process, or use "
                f"DEVLAYER_BACKEND=cpu for multi-process runs"
            )
        comm_name = be.comm_backend(comm) if info.world_size > 1 else None
        _check_single_process_count(be, spec, spec_origin, info)
        if spec_origin == "DEVLAYER_DEVICES":
            _warn_count_or_index(be, spec, os.environ["DEVLAYER_DEVICES"], info)

        undo = _Undo()
        try:
            visibility = _apply_visibility(be, spec, spec_origin, undo)
            index = _pick_device(be, spec, spec_origin, info, comm_name)
            dev = be.device(index)
            if index is not None:
                be.set_device(index)
            want_default = set_default_device
            if want_default is None:
                want_default = _env_flag("DEVLAYER_SET_DEFAULT_DEVICE", be.device_type != "cpu")
            if want_default and be.device_type != "cpu" and not _simulated(be):
                import torch

                torch.set_default_device(dev)
                undo.default_device_set = True
            _call_hooks(hooks, be)
            for name, value in _interop_env(be, info).items():
                if name not in os.environ:
                    undo.setenv(name, value)
            owns = False
            if info.world_size > 1:
                assert comm_name is not None
                for name, value in be.comm_env(comm_name, info).items():
                    if name not in os.environ:
                        undo.setenv(name, value)
                be.prepare(comm_name)
                owns = _create_process_group(be, comm_name, dev, info, tmo)
        except BaseException:
            _restore(undo)
            raise
        _undo.env, _undo.default_device_set = undo.env, undo.default_device_set
        _current = State(
            backend=be.name,
            device=dev,
            device_index=index,
            comm=comm_name,
            process=info,
            timeout=tmo,
            visibility=visibility,
            reason=selection.reason,
            owns_process_group=owns,
            _key=key,
        )
        log.debug("devlayer initialized: %s", _current)
        return _current


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


def _freeze(value: object) -> object:
    if isinstance(value, list):
        return tuple(value)
    return value


def resolve_hooks(
    hooks: Iterable[AcceleratorHook] | None, env: Mapping[str, str]
) -> list[tuple[str, Callable[[Any], object]]]:
    """``(name, callable)`` for each accelerator hook, importing ``"module:function"`` names.

    Args:
        hooks: The ``accelerator_hooks`` argument; None reads ``DEVLAYER_ACCELERATOR_HOOKS``.
        env: The environment to read it from.

    Raises:
        InvalidArgumentError: A name that is not ``module:function``, cannot be imported,
            or is not callable.

    Example:
        >>> [name for name, _ in resolve_hooks(None, {"DEVLAYER_ACCELERATOR_HOOKS": "os:getcwd"})]
        ['os:getcwd']
        >>> resolve_hooks((), {"DEVLAYER_ACCELERATOR_HOOKS": "os:getcwd"})
        []
    """
    origin = "accelerator_hooks"
    hooks = _hook_list(hooks)
    if hooks is None:
        raw = env.get("DEVLAYER_ACCELERATOR_HOOKS", "")
        hooks = [part.strip() for part in raw.split(",") if part.strip()]
        origin = "DEVLAYER_ACCELERATOR_HOOKS"
    out: list[tuple[str, Callable[[Any], object]]] = []
    for hook in hooks:
        if callable(hook):
            name = getattr(hook, "__qualname__", repr(hook))
            out.append((f"{getattr(hook, '__module__', '?')}:{name}", hook))
            continue
        if not isinstance(hook, str) or hook.count(":") != 1:
            raise InvalidArgumentError(
                f"{origin} entry {hook!r} is neither a callable nor 'package.module:function' "
                f"(e.g. 'ptychi.device:set_torch_accelerator_module')"
            )
        module_name, _, attr = hook.partition(":")
        try:
            target: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                target = getattr(target, part)
        except (ImportError, AttributeError) as exc:
            raise InvalidArgumentError(
                f"{origin} entry {hook!r} cannot be loaded ({exc}); check the spelling and that "
                f"the package is installed in this environment"
            ) from exc
        if not callable(target):
            raise InvalidArgumentError(
                f"{origin} entry {hook!r} is a {type(target).__name__}, not a function"
            )
        out.append((hook, target))
    return out


def _hook_list(hooks: Iterable[AcceleratorHook] | AcceleratorHook | None) -> list[Any] | None:
    """The hooks argument as a list (one hook may be passed bare); None stays None."""
    if hooks is None:
        return None
    if isinstance(hooks, str) or callable(hooks):
        return [hooks]
    return list(hooks)


def _call_hooks(hooks: list[tuple[str, Callable[[Any], object]]], be: Backend) -> None:
    if not hooks:
        return
    module = _torch_module(be.device_type)
    for name, hook in hooks:
        try:
            hook(module)
        except Exception as exc:
            raise DevlayerError(
                f"accelerator hook {name} raised {type(exc).__name__}: {exc} (called with "
                f"{module.__name__}); fix the hook or remove it from accelerator_hooks / "
                f"DEVLAYER_ACCELERATOR_HOOKS"
            ) from exc


def _torch_module(device_type: str) -> ModuleType:
    import torch

    try:  # torch's own answer (plugins registered with torch included)
        module = torch.get_device_module(device_type)
    except (RuntimeError, AttributeError):
        module = getattr(torch, device_type, None)
    if module is None:
        raise DevlayerError(
            f"torch {torch.__version__} has no module torch.{device_type} for accelerator hooks"
        )
    return module


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
    return _torch_module(state().device.type)


_KEY_ENV = (
    "DEVLAYER_BACKEND",
    "DEVLAYER_DEVICES",
    "DEVLAYER_COMM",
    "DEVLAYER_TIMEOUT",
    "DEVLAYER_SET_DEFAULT_DEVICE",
    "DEVLAYER_ACCELERATOR_HOOKS",
)


def _describe_key(key: tuple[Any, ...]) -> str:
    names = (
        "backend",
        "devices",
        "timeout",
        "comm",
        "set_default_device",
        "accelerator_hooks",
        *_KEY_ENV,
    )
    return ", ".join(
        f"{n}={v!r}" for n, v in zip(names, key, strict=True) if v is not None or n[0].islower()
    )


def _interop_env(be: Backend, info: ProcessInfo) -> dict[str, str]:
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


def _simulated(be: Backend) -> bool:
    return bool(getattr(be.runtime, "simulated", False))


def _check_single_process_count(
    be: Backend, spec: _devices.DeviceSpec, origin: str, info: ProcessInfo
) -> None:
    """Refuse ``devices=N`` (N > 1) in a process that no launcher started.

    Lightning-style ``devices=2`` means two ranks; a plain ``python script.py`` is one rank
    and would quietly use one device. Starting ranks from inside ``init()`` would surprise
    more than an error that says how to start them.
    """
    if not isinstance(spec, int) or spec < 2 or info.launcher != "none":
        return
    raise DeviceError(
        f"{origin}={spec} asks for a count of {spec} devices, one per rank, but no launcher "
        f"started this single process, so it would use one (it sees {be.device_count()} "
        f"{be.device_type} device(s)). Start N ranks with devlayer.spawn(fn, nprocs=N), "
        f"`devlayer launch --nproc N script.py` or `torchrun --nproc-per-node=N script.py`; "
        f"for one process use devices=1 or an index such as '1,'"
    )


_count_warned = False


def _warn_count_or_index(
    be: Backend, spec: _devices.DeviceSpec, raw: str, info: ProcessInfo
) -> None:
    """Warn once when ``DEVLAYER_DEVICES=N`` could also be read as the index N.

    ``DEVLAYER_DEVICES=1`` is a count (device 0), as in Lightning; someone translating
    ``CUDA_VISIBLE_DEVICES=1`` means device 1. Only when device N exists are both readings
    possible; ``N,`` / ``[N]`` (an index) and ``0,1`` (indices) say which one is meant.
    """
    global _count_warned
    if _count_warned or not isinstance(spec, int) or info.local_rank != 0:
        return
    if not be.indexed or be.visibility_var(os.environ) is None:
        return
    if spec >= be.device_count():  # no device N: the count is the only reading
        return
    _count_warned = True
    import warnings

    first = "device 0" if spec == 1 else f"devices 0..{spec - 1}"
    listed = ",".join(map(str, range(spec))) + ("," if spec == 1 else "")
    warnings.warn(
        f"DEVLAYER_DEVICES={raw.strip()} is read as a count: the first {spec} visible "
        f"{be.device_type} device(s) ({first}), not the device with index {spec} (as "
        f"CUDA_VISIBLE_DEVICES={spec} would mean). For the index write "
        f"DEVLAYER_DEVICES={spec}, (or [{spec}]); to keep the count without this warning "
        f"write the indices, DEVLAYER_DEVICES={listed}",
        UserWarning,
        stacklevel=3,
    )


def _apply_visibility(
    be: Backend, spec: _devices.DeviceSpec, origin: str, undo: _Undo
) -> tuple[str, str] | None:
    """Narrow the vendor's visibility variable before its runtime starts."""
    if isinstance(spec, int):  # a count is checked as a number before any list is built
        _devices.check_exists(spec, be.device_count(), device_type=be.device_type, origin=origin)
    indices = _devices.selected_indices(spec)
    if indices is None:
        return None
    var = be.visibility_var(os.environ)
    if var is None:
        # cpu and mps: one device; only "device 0" makes sense.
        _devices.check_exists(spec, be.device_count(), device_type=be.device_type, origin=origin)
        return None
    marker = f"{var}={','.join(map(str, indices))}"
    if marker in os.environ.get(APPLIED_MARKER, "").split(";"):
        return (var, os.environ.get(var, ""))
    _devices.check_exists(spec, be.device_count(), device_type=be.device_type, origin=origin)
    new_value = _devices.narrow_visibility(os.environ.get(var), indices)
    if be.runtime.is_initialized():
        if os.environ.get(var) == new_value:
            return (var, new_value)
        raise InitOrderError(
            f"the {be.name} runtime was initialized before devlayer.init() could set "
            f"{var}={new_value!r} (from {origin}={_show(spec)}); the runtime reads {var} only "
            f"once, at its start. Something called into torch.{be.device_type} first (e.g. "
            f"torch.{be.device_type}.is_available(), .to('{be.device_type}'), or a library "
            f"import). Fix: call devlayer.init() before that, put `import devlayer.early` at "
            f"the very top of the script with DEVLAYER_DEVICES set, or export {var} before "
            f"starting Python"
        )
    undo.setenv(var, new_value)
    undo.setenv(APPLIED_MARKER, marker)
    seen = be.device_count()
    if seen < len(indices):
        raise DeviceError(
            f"{origin}={_show(spec)}: after setting {var}={new_value!r} the {be.name} runtime "
            f"sees {seen} device(s), expected {len(indices)}; check the indices with "
            f"`devlayer info`"
        )
    return (var, new_value)


_show = _devices.show_spec


def _pick_device(
    be: Backend,
    spec: _devices.DeviceSpec,
    origin: str,
    info: ProcessInfo,
    comm: str | None = None,
) -> int | None:
    if not be.indexed:
        return None
    count = be.device_count()
    if count < 1:
        raise DeviceError(
            f"backend {be.name!r} sees no devices after visibility was applied "
            f"({', '.join(f'{v}={os.environ.get(v)!r}' for v in be.visibility_vars)}); "
            f"check the visibility variables with `devlayer info`"
        )
    wanted = _devices.selected_indices(spec)
    if wanted is not None and len(wanted) < info.local_world_size:
        raise DeviceError(
            f"{origin}={_show(spec)} selects {len(wanted)} device(s) but {info.local_world_size} "
            f"ranks run on this node; list at least {info.local_world_size} devices or start "
            f"fewer ranks per node"
        )
    if 1 < count < info.local_world_size:
        _check_shared_devices(be, comm, count, info)
    return _devices.device_index(info.local_rank, count)


_shared_warned = False


def _check_shared_devices(be: Backend, comm: str | None, count: int, info: ProcessInfo) -> None:
    """More ranks on this node than devices: an error where the comm refuses, else a warning.

    One visible device per rank (``count == 1``) is left alone: that is how schedulers bind
    one GPU to each task, where every rank sees a different device as device 0.
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
    if (
        comm is not None
        and not be.shares_devices_between_ranks(comm)
        and not _env_flag("DEVLAYER_ALLOW_SHARED_DEVICES", False)
    ):
        raise DeviceError(
            f"{what}; the {comm!r} communication backend refuses two ranks on one device in "
            f"most versions. Start at most {count} ranks per node or make more devices "
            f"visible; set DEVLAYER_ALLOW_SHARED_DEVICES=1 to try anyway"
        )
    if info.rank == 0 and not _shared_warned:
        _shared_warned = True
        log.warning("%s; sharing a device between ranks is discouraged (slow, memory)", what)


def _create_process_group(
    be: Backend, comm: str, dev: torch.device, info: ProcessInfo, timeout: timedelta
) -> bool:
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
        return False
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
        raise RendezvousError(
            f"creating the {pg_backend!r} process group failed on rank {info.rank} of "
            f"{info.world_size} ({info.master_addr}:{info.master_port}): {exc}"
        ) from exc
    _guard_exit()
    return True


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


def rendezvous(info: ProcessInfo, timeout: timedelta) -> Any:
    """Connect to (rank 0: host) the TCP store and wait until every rank checked in.

    Each torchelastic restart gets its own key prefix, so a restarted job never reads
    the addresses of the attempt that died (torchrun reuses its agent's store).

    Returns:
        A ``torch.distributed.PrefixStore`` ready for ``init_process_group``.

    Raises:
        RendezvousError: Port in use, address unreachable, a rank missing or duplicated.
    """
    import torch.distributed as dist

    port = info.master_port
    addr = _unbracket(info.master_addr)  # "[::1]" names the host ::1
    where = f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
    src = info.sources
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    is_server = info.rank == 0 and not agent_store
    store_host = "torchrun's agent" if agent_store else "rank 0"
    deadline = time.monotonic() + timeout.total_seconds()
    kwargs: dict[str, Any] = {}
    if is_server and _is_loopback(addr):
        try:
            kwargs["master_listen_fd"], _ = loopback_listener(int(port or 0), addr)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise RendezvousError(
                    f"rank 0 cannot listen on {where}: {exc.strerror or exc} (MASTER_ADDR from "
                    f"{src.get('master_addr', 'MASTER_ADDR')}); name a loopback address this "
                    f"host has, e.g. MASTER_ADDR=127.0.0.1"
                ) from exc
            raise _port_in_use(where, port, src) from exc

    def make_store() -> Any:
        return dist.TCPStore(
            host_name=addr,
            port=int(port or 0),
            world_size=info.world_size,
            is_master=is_server,
            timeout=timeout,
            wait_for_workers=False,
            multi_tenant="master_listen_fd" not in kwargs,
            **kwargs,
        )

    try:
        base = make_store() if is_server else _bounded(make_store, deadline)
    except TimeoutError:
        raise RendezvousError(
            f"rank {info.rank} got no answer from a rendezvous store at {where} within "
            f"{timeout.total_seconds():g}s: the connection was accepted but nothing answered "
            f"as a torch store, so another program probably holds the port. "
            f"{_store_host_hint(store_host, where)}"
        ) from None
    except Exception as exc:
        text = str(exc)
        if is_server and ("in use" in text.lower() or "EADDRINUSE" in text):
            raise _port_in_use(where, port, src) from exc
        raise RendezvousError(
            f"rank {info.rank} could not reach the rendezvous store at {where} within "
            f"{timeout.total_seconds():g}s (MASTER_ADDR from "
            f"{src.get('master_addr', 'MASTER_ADDR')}, MASTER_PORT from "
            f"{src.get('master_port', 'MASTER_PORT')}): {text.splitlines()[0] if text else exc!r}. "
            f"{_store_host_hint(store_host, where)}"
        ) from exc
    store = dist.PrefixStore(f"devlayer/attempt{info.restart_count}/", base)
    try:
        claims = store.add(f"rank{info.rank}", 1)
        if claims > 1:
            raise RendezvousError(
                f"two processes claim rank {info.rank} at {where} (rank from "
                f"{src.get('rank', 'RANK')}); every process needs a distinct rank, or another "
                f"job uses the same MASTER_PORT"
            )
        store.set(f"host{info.rank}", socket.gethostname())
        store.add("joined", 1)
        _wait_for_all(store, info, where, deadline, timeout)
    except RendezvousError:
        raise
    except Exception as exc:  # the store's host went away (torch's DistNetworkError & co.)
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if is_server:
            hint = "this process hosts the store; see the first error above"
        else:
            hint = _store_host_hint(store_host, where)
        raise RendezvousError(
            f"rank {info.rank} lost the rendezvous store at {where} while the ranks were "
            f"meeting ({text}). {hint}"
        ) from exc
    return store


def _bounded(make: Callable[[], Any], deadline: float) -> Any:
    """``make()`` in a helper thread, given up at ``deadline`` (``time.monotonic()``).

    torch's TCPStore client waits forever for an answer when the port is held by a program
    that accepts connections but is not a store (seen with torch 2.13: a listener that
    never answers kept rank 1 waiting past a 4 s timeout for over a minute). The call
    releases the GIL, so the thread can be left behind (daemon) while the error is raised.

    Raises:
        TimeoutError: ``make()`` did not return by the deadline (plus one second for torch's
            own timeout error to arrive first).
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = make()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name="devlayer-store-connect", daemon=True)
    thread.start()
    thread.join(max(deadline - time.monotonic(), 0.0) + 1.0)
    if "error" in box:
        raise box["error"]
    if "value" in box:
        return box["value"]
    raise TimeoutError


def _unbracket(addr: str) -> str:
    """``"[::1]"`` -> ``"::1"`` (URL-style brackets around an IPv6 address)."""
    addr = addr.strip()
    return addr[1:-1] if addr.startswith("[") and addr.endswith("]") else addr


def _store_host_hint(store_host: str, where: str) -> str:
    """What a rank that cannot use the store should look at (issue 14: blame the cause)."""
    return (
        f"{store_host} (the store host) probably failed to start the store at {where} (a port "
        f"in use, an address this host does not have) or exited: look at {store_host}'s "
        f"output for its first error; otherwise check that {where} is reachable from here"
    )


def _is_loopback(addr: str) -> bool:
    import ipaddress

    if addr == "localhost":
        return True
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def _port_in_use(where: str, port: object, src: Mapping[str, str]) -> RendezvousError:
    return RendezvousError(
        f"rank 0 cannot listen on {where}: port {port} is already in use "
        f"(MASTER_PORT: {src.get('master_port', 'MASTER_PORT')}). Choose a free "
        f"port (export MASTER_PORT=...), or stop the process holding it"
    )


def loopback_listener(port: int = 0, host: str = "127.0.0.1") -> tuple[int, int]:
    """A socket listening on one loopback address only, for a TCP store's ``master_listen_fd``.

    torch's store server otherwise listens on every interface; on one node nothing outside
    this machine needs to reach it. ``host`` is the loopback address ``MASTER_ADDR`` names
    (``127.0.0.1``, ``127.0.0.2``, ``::1``...; ``localhost`` = ``127.0.0.1``), so clients that
    connect there find it. Returns ``(file descriptor, port)``; the store owns the
    descriptor from then on.

    Raises:
        OSError: The port is taken, or this host has no such address.
    """
    host = "127.0.0.1" if host in ("", "localhost") else _unbracket(host)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # Rerunning a job on the same derived port must not wait for TIME_WAIT to expire
    # (torch's own store sets SO_REUSEADDR too); a live listener still makes bind fail.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(512)
    except OSError:
        sock.close()
        raise
    bound = int(sock.getsockname()[1])
    return sock.detach(), bound


def _wait_for_all(
    store: Any, info: ProcessInfo, where: str, deadline: float, timeout: timedelta
) -> None:
    next_note = time.monotonic() + 30.0
    delay = 0.002
    while True:
        joined = store.add("joined", 0)
        if joined == info.world_size:
            return
        now = time.monotonic()
        if joined > info.world_size:
            raise RendezvousError(
                f"{joined} processes joined at {where} but WORLD_SIZE={info.world_size}; "
                f"another job is using the same MASTER_PORT, or WORLD_SIZE is too small"
            )
        if now >= deadline:
            missing = [r for r in range(info.world_size) if not store.check([f"host{r}"])]
            raise RendezvousError(
                f"expected {info.world_size} ranks (WORLD_SIZE from "
                f"{info.sources.get('world_size', 'WORLD_SIZE')}) at {where}, but only "
                f"{joined} joined within {timeout.total_seconds():g}s; missing rank(s): "
                f"{', '.join(map(str, missing))}. Start as many processes as WORLD_SIZE says, "
                f"or check why those ranks did not start"
            )
        if now >= next_note:
            log.warning(
                "rank %d: waiting at %s for %d more rank(s) (%d of %d joined)",
                info.rank,
                where,
                info.world_size - joined,
                joined,
                info.world_size,
            )
            next_note = now + 30.0
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


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
