"""The registry of backends, backend selection, and what the library derives from a backend.

A *backend* is one device vendor: ``cuda`` (NVIDIA and ROCm builds), ``xpu``, ``mps``,
``cpu`` or a third-party plugin. What a vendor defines is the contract in
:mod:`devlayer.vendor`; each lives in one file under ``backends/`` (installed as
``devlayer.backends``) or in another package that registers through the entry-point group
``devlayer.backends``::

    [project.entry-points."devlayer.backends"]
    mynpu = "mynpu_devlayer:NpuBackend"

Lookups (:func:`get_backend`, :func:`registered_backends`, :func:`select_backend`) return
a :class:`BoundBackend`: the registered backend joined to its :class:`Runtime`, the
*hardware seam*. The runtime is decided at the lookup, once: a simulated one when
:mod:`devlayer.simulation` has one for the backend's name (``DEVLAYER_SIMULATE``,
``devlayer.testing.simulate``), else the backend's real one.

Selection order: explicit ``backend=`` argument, then ``DEVLAYER_BACKEND``, then
auto-detection by descending :attr:`Backend.priority` among available backends
(cuda 100 > xpu 90 > mps 50 > cpu 0). Auto-detection never initializes a vendor runtime:
device counts come from NVML / AMD SMI / Level Zero sysman, which torch queries without
creating a context.
"""

from __future__ import annotations

import importlib
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, cast

from devlayer import simulation
from devlayer.config import Settings, short_repr
from devlayer.errors import (
    BackendNotFoundError,
    BackendUnavailableError,
    DevlayerError,
    InvalidArgumentError,
)
from devlayer.vendor import (
    Availability,
    Backend,
    Runtime,
    missing_runtime_members,
)

if TYPE_CHECKING:
    import torch

    from devlayer.launchers import ProcessInfo

__all__ = [
    "BoundBackend",
    "available_backends",
    "choose_backend",
    "get_backend",
    "register_backend",
    "registered_backends",
    "select_backend",
    "unregister_backend",
]

ENTRY_POINT_GROUP = "devlayer.backends"

#: Built-in backends: name -> "module:Class". Imported only when first needed.
BUILTINS: dict[str, str] = {
    "cuda": "devlayer.backends.cuda:CudaBackend",
    "xpu": "devlayer.backends.xpu:XpuBackend",
    "mps": "devlayer.backends.mps:MpsBackend",
    "cpu": "devlayer.backends.cpu:CpuBackend",
}


def torch_comm_available(comm: str) -> bool:
    """Whether torch.distributed has the process-group backend ``comm`` (vendor-neutral).

    Example:
        >>> torch_comm_available("gloo")
        True
    """
    import torch.distributed as dist

    if not dist.is_available():
        return False
    check = getattr(dist, "is_backend_available", None)
    if check is not None:
        return bool(check(comm))
    return comm in dist.Backend.backend_list  # pragma: no cover (torch < 2.3)


def torch_default_comm(device_type: str) -> str:
    """The process-group backend torch maps ``device_type`` to; ``gloo`` when none.

    Example:
        >>> torch_default_comm("cpu")
        'gloo'
    """
    try:
        from torch.distributed import Backend as TorchBackend
    except ImportError:  # torch built without distributed support
        return "gloo"
    return str(TorchBackend.default_device_backend_map.get(device_type, "gloo"))


class BoundBackend:
    """A registered backend joined to the runtime it uses: what the library derives from it.

    The registry builds one at every lookup (:func:`get_backend`, :func:`registered_backends`,
    :func:`select_backend`) and decides its runtime then, once: the simulated one when
    simulation is on for the backend's name (``DEVLAYER_SIMULATE``,
    ``devlayer.testing.simulate``), else the backend's real one, made on first use and
    shared by every lookup. It keeps that runtime for its life.

    Attributes:
        backend: The vendor's :class:`~devlayer.vendor.Backend`, as registered.
        simulated: Whether the runtime is a simulated one.

    Example:
        >>> import devlayer
        >>> cpu = devlayer.backends.get_backend("cpu")
        >>> (cpu.name, cpu.indexed, cpu.device_count(), str(cpu.device(None)))
        ('cpu', False, 1, 'cpu')
    """

    def __init__(
        self, backend: Backend, runtime: Runtime | None = None, *, simulated: bool = False
    ) -> None:
        self.backend = backend
        self.simulated = simulated
        self._runtime = runtime

    # -- the vendor's declarations ------------------------------------------------------------
    @property
    def name(self) -> str:
        """Registry key and the value of ``DEVLAYER_BACKEND``."""
        return self.backend.name

    @property
    def priority(self) -> int:
        """Auto-detection order; higher is tried first."""
        return self.backend.priority

    @property
    def device_type(self) -> str:
        """The torch device type."""
        return self.backend.device_type

    @property
    def visibility_vars(self) -> tuple[str, ...]:
        """The variables that restrict visible devices; the first is the one narrowed."""
        return self.backend.visibility_vars

    # -- derived ----------------------------------------------------------------------------
    @property
    def runtime(self) -> Runtime:
        """The runtime in use: the one bound at lookup, else the backend's real one."""
        if self._runtime is None:
            self._runtime = real_runtime(self.backend)
        return self._runtime

    @property
    def indexed(self) -> bool:
        """Devices have indices and each rank picks one: true when there is a visibility
        variable to narrow (False for cpu and mps)."""
        return bool(self.backend.visibility_vars)

    @property
    def multi_process(self) -> bool:
        """False when no comm backend carries this device's tensors (``comms == ()``: mps)."""
        return self.backend.comms != ()

    @property
    def bind_device_id(self) -> bool:
        """Pass ``device_id`` to ``init_process_group``: the runtime's declaration."""
        return bool(self.runtime.bind_device_id)

    def availability(self) -> Availability:
        """Can this backend run here? Never initializes the vendor runtime."""
        return self.backend.availability(self.runtime)

    def default_comm(self) -> str:
        """The first of the backend's ``comms`` that torch has; torch's own when it declares none.

        Raises:
            BackendUnavailableError: None of the declared comm backends is available.
        """
        comms = self.backend.comms
        if not comms:  # None: torch's; (): one process, torch's shown by `devlayer info`
            return torch_default_comm(self.device_type)
        for comm in comms:
            if self.comm_available(comm):
                return comm
        return self._no_comm(comms)

    def _no_comm(self, comms: tuple[str, ...]) -> NoReturn:
        *rest, last = comms
        has = f"no {last}" if not rest else f"neither {' nor '.join([*rest, last])}"
        raise BackendUnavailableError(
            f"{self.name} needs a communication backend for several ranks, and this install "
            f"has {has}: {self.backend.hint(comms[0])}"
        )

    def comm_available(self, comm: str) -> bool:
        """Whether the process-group backend ``comm`` exists: asked of the runtime when it
        knows (simulation, oneCCL), else of torch."""
        check = getattr(self.runtime, "comm_available", None)
        if check is not None:
            return bool(check(comm))
        return torch_comm_available(comm)

    def comm_backend(self, requested: str | None = None) -> str:
        """The process-group backend to use, checked against what torch has.

        Args:
            requested: A comm backend the user asked for (``comm=`` / ``DEVLAYER_COMM``).

        Raises:
            BackendUnavailableError: The requested or default comm backend is missing.
        """
        comm = (requested or self.default_comm()).lower()
        if not self.comm_available(comm):
            raise BackendUnavailableError(
                f"communication backend {comm!r} is not available for backend {self.name!r} "
                f"in this torch build; {self.backend.hint(comm)}"
            )
        return comm

    def shares_devices_between_ranks(self, comm: str) -> bool:
        """Whether ``comm`` lets two ranks use one device: not one of ``exclusive_comms``."""
        return comm not in self.backend.exclusive_comms

    def device_count(self) -> int:
        """Number of devices this process sees."""
        return self.runtime.device_count()

    def set_device(self, index: int) -> None:
        """Make device ``index`` current for this process."""
        self.runtime.set_device(index)

    def device(self, index: int | None) -> torch.device:
        """The torch device for ``index`` (``None`` = no index, e.g. ``cpu``)."""
        import torch

        return (
            torch.device(self.device_type, index)
            if index is not None
            else torch.device(self.device_type)
        )

    def visibility_var(self, env: Mapping[str, str]) -> str | None:
        """The variable to narrow when restricting devices (``None`` = cannot restrict)."""
        return self.backend.visibility_var(env, self.runtime)

    # -- the vendor's methods, as they are ------------------------------------------------------
    def prepare(
        self,
        comm: str,
        process: ProcessInfo | None = None,
        env: MutableMapping[str, str] | None = None,
    ) -> None:
        """The vendor's work before the process group for ``comm`` exists."""
        self.backend.prepare(comm, process, env)

    def hint(self, comm: str | None = None) -> str:
        """What to install or check: for this backend, or for a missing comm backend ``comm``."""
        return self.backend.hint(comm)

    def notes(self, env: Mapping[str, str], *, selected: bool) -> list[str]:
        """Known pitfalls of this vendor for ``devlayer info``."""
        return self.backend.notes(env, selected=selected)

    def __repr__(self) -> str:
        how = "simulated" if self.simulated else "real"
        return f"<BoundBackend {self.backend!r} runtime={how}>"


_real_runtimes: weakref.WeakKeyDictionary[Backend, Runtime] = weakref.WeakKeyDictionary()


def checked_runtime(runtime: object, backend: Backend, origin: str) -> Runtime:
    """``runtime`` when it has every member of :class:`Runtime`; else an error naming them.

    Raises:
        InvalidArgumentError: Members are missing (e.g. a runtime written before ``variant``
            and ``bind_device_id`` were declared).
    """
    missing = missing_runtime_members(runtime)
    if missing:
        raise InvalidArgumentError(
            f"backend {backend.name!r}: {origin} gave {type(runtime).__name__}, which lacks "
            f"{', '.join(missing)}; subclass devlayer.backends.Runtime (it gives variant='' and "
            f"bind_device_id=False) or define them"
        )
    return cast("Runtime", runtime)


def real_runtime(backend: Backend) -> Runtime:
    """The real runtime of ``backend``: its ``make_runtime()``, called once, then reused."""
    with _lock:
        runtime = _real_runtimes.get(backend)
        if runtime is None:
            runtime = checked_runtime(backend.make_runtime(), backend, "make_runtime()")
            _real_runtimes[backend] = runtime
        return runtime


def bind(backend: Backend) -> BoundBackend:
    """``backend`` joined to its runtime: the simulated one when simulation is on for its
    name (asked here, once), else its real one (made on first use)."""
    spec = Settings.from_env(os.environ, ("simulate",)).simulate
    simulated = simulation.runtime_for(backend.name, spec)
    if simulated is None:
        return BoundBackend(backend)
    runtime = checked_runtime(simulated, backend, "the simulation")
    return BoundBackend(backend, runtime, simulated=True)


class _Environ(MutableMapping[str, str]):
    """``os.environ`` seen through a setter that records what it changed."""

    def __init__(self, setenv: Callable[[str, str], None]) -> None:
        self._setenv = setenv

    def __getitem__(self, key: str) -> str:
        return os.environ[key]

    def __setitem__(self, key: str, value: str) -> None:
        self._setenv(key, value)

    def __delitem__(self, key: str) -> None:
        raise InvalidArgumentError(f"prepare() may set {key}, not remove it")

    def __iter__(self) -> Iterator[str]:
        return iter(os.environ)

    def __len__(self) -> int:
        return len(os.environ)


def prepare_comm(
    backend: BoundBackend, comm: str, process: ProcessInfo, setenv: Callable[[str, str], None]
) -> None:
    """Run ``backend.prepare(comm, process, env)`` before the process group for ``comm`` exists.

    ``env`` is ``os.environ`` seen through ``setenv(name, value)``, which sets a variable and
    records it for ``shutdown()``.
    """
    backend.prepare(comm, process, _Environ(setenv))


def comm_owner(name: str, backends: Mapping[str, BoundBackend]) -> str | None:
    """The device backend to suggest for a process-group backend name (``nccl`` -> cuda).

    Asked of torch: the registered backend whose device type torch maps ``name`` to (the
    lowest priority when several share it, so ``gloo`` -> cpu), or, for a process-group
    backend torch knows without a device (``mpi``), the lowest-priority backend.
    """
    key = name.strip().lower()
    try:
        from torch.distributed import Backend as TorchBackend
    except ImportError:  # pragma: no cover (torch without distributed)
        return None
    by_priority = sorted(backends.values(), key=lambda b: b.priority)
    mapped = {d for d, c in TorchBackend.default_device_backend_map.items() if c == key}
    for be in by_priority:
        if be.device_type in mapped:
            return be.name
    known = set(TorchBackend.backend_list) - {"undefined", "fake"}
    if key in known and by_priority:
        return by_priority[0].name
    return None


# --------------------------------------------------------------------------- registry

_lock = threading.RLock()
_backends: dict[str, Backend] = {}
_loaded_builtins = False
_loaded_entry_points = False
_entry_point_errors: dict[str, str] = {}


def _as_backend(obj: object, origin: str) -> Backend:
    if (isinstance(obj, type) and issubclass(obj, Backend)) or (
        callable(obj) and not isinstance(obj, Backend)
    ):
        obj = obj()
    if not isinstance(obj, Backend):
        raise InvalidArgumentError(
            f"{origin} gave {obj!r}; expected a devlayer.backends.Backend subclass, instance "
            "or factory"
        )
    if not obj.name or not obj.device_type:
        raise InvalidArgumentError(
            f"{origin}: backend {type(obj).__name__} must set the class attributes "
            f"'name' and 'device_type'"
        )
    # get_backend() looks names up stripped and lower-cased, and "auto" means auto-detection:
    # a backend registered under any other spelling could never be selected.
    if obj.name != obj.name.strip().lower() or obj.name == "auto":
        raise InvalidArgumentError(
            f"{origin}: backend {type(obj).__name__} has name={obj.name!r}; a backend name is "
            f"lower-case without surrounding spaces and is not 'auto' "
            f"(e.g. {obj.name.strip().lower()!r})"
        )
    return obj


def _load_builtins() -> None:
    global _loaded_builtins
    if _loaded_builtins:
        return
    for name, target in BUILTINS.items():
        if name in _backends:
            continue
        module, _, attr = target.partition(":")
        try:
            loaded = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name not in ("devlayer.backends", module):
                raise
            raise DevlayerError(
                f"cannot import {module}: the built-in backends are missing. In a source "
                "checkout they live in the top-level backends/ folder, which only an install "
                "maps to devlayer.backends; run `pip install -e .` there (or install the wheel)"
            ) from exc
        _backends[name] = _as_backend(getattr(loaded, attr), target)
    _loaded_builtins = True


def _load_entry_points() -> None:
    global _loaded_entry_points
    if _loaded_entry_points:
        return
    _loaded_entry_points = True
    from importlib.metadata import entry_points

    # A broken plugin (or broken package metadata) must not break the built-ins: every
    # failure is recorded for entry_point_errors() and named by get_backend().
    try:
        eps = list(entry_points(group=ENTRY_POINT_GROUP))
    except Exception as exc:
        _entry_point_errors["<entry points>"] = f"{type(exc).__name__}: {exc}"
        return
    for ep in eps:
        if ep.name in _backends:
            _entry_point_errors[ep.name] = (
                f"entry point {ep.name!r} ({getattr(ep, 'value', '?')}) ignored: a backend of "
                f"that name is already registered ({type(_backends[ep.name]).__name__})"
            )
            continue
        try:
            backend = _as_backend(ep.load(), f"entry point {ep.name!r}")
            if backend.name != ep.name:
                # The entry point name is what users put in DEVLAYER_BACKEND; the backend's
                # name is what State.backend reports and simulate() keys on. They must agree.
                raise InvalidArgumentError(
                    f"entry point {ep.name!r} loads backend {type(backend).__name__} named "
                    f"{backend.name!r}; name the entry point {backend.name!r} (the entry point "
                    f"name must equal Backend.name)"
                )
            if backend.name in _backends:
                raise DevlayerError(
                    f"entry point {ep.name!r}: a backend named {backend.name!r} is already "
                    f"registered"
                )
            _backends[backend.name] = backend
        except Exception as exc:
            _entry_point_errors[ep.name] = f"{type(exc).__name__}: {exc}"


def _ensure_loaded() -> None:
    with _lock:
        _load_builtins()
        _load_entry_points()


def register_backend(backend: Backend | type[Backend], *, replace: bool = False) -> Backend:
    """Register a backend so ``init(backend=name)`` and ``DEVLAYER_BACKEND`` find it.

    Args:
        backend: A :class:`Backend` subclass or instance.
        replace: Replace a backend already registered under the same name.

    Returns:
        The registered instance (lookups return it joined to its runtime, a
        :class:`BoundBackend`).

    Raises:
        DevlayerError: The name is taken and ``replace`` is False.

    Example:
        >>> import devlayer
        >>> class Demo(devlayer.backends.Backend):
        ...     name, device_type = "demo-doc", "cpu"
        >>> devlayer.backends.register_backend(Demo).name
        'demo-doc'
        >>> devlayer.backends.unregister_backend("demo-doc")
    """
    obj = _as_backend(backend, "register_backend()")
    with _lock:
        _ensure_loaded()
        if obj.name in _backends and not replace:
            raise DevlayerError(
                f"a backend named {obj.name!r} is already registered "
                f"({type(_backends[obj.name]).__name__}); pass replace=True to replace it"
            )
        _backends[obj.name] = obj
    return obj


def unregister_backend(name: str) -> None:
    """Remove a registered backend (tests and plugins that clean up after themselves)."""
    with _lock:
        _ensure_loaded()
        _backends.pop(name, None)


def registered_backends() -> dict[str, BoundBackend]:
    """All registered backends by name, highest priority first, each bound to its runtime.

    Example:
        >>> import devlayer
        >>> sorted(devlayer.backends.registered_backends())[:4]
        ['cpu', 'cuda', 'mps', 'xpu']
    """
    _ensure_loaded()
    with _lock:
        items = sorted(_backends.items(), key=lambda kv: (-kv[1].priority, kv[0]))
    return {name: bind(backend) for name, backend in items}


def available_backends() -> list[str]:
    """Names of the backends that can run here, in auto-detection order.

    Example:
        >>> import devlayer
        >>> "cpu" in devlayer.backends.available_backends()
        True
    """
    return [name for name, b in registered_backends().items() if _safe_availability(b)]


def entry_point_errors() -> dict[str, str]:
    """Plugins whose entry point failed to load, with the error text."""
    _ensure_loaded()
    return dict(_entry_point_errors)


def _safe_availability(backend: BoundBackend) -> Availability:
    try:
        return backend.availability()
    except Exception as exc:  # a probe must not crash selection; report it instead
        return Availability(False, f"availability check failed: {type(exc).__name__}: {exc}")


def get_backend(name: str, *, origin: str = "backend") -> BoundBackend:
    """The registered backend called ``name``, bound to its runtime (simulated or real).

    Raises:
        BackendNotFoundError: Unknown name; the message lists the registered ones.
    """
    backends = registered_backends()
    key = name.strip().lower()
    if key not in backends:
        err = BackendNotFoundError.for_name(
            name, backends, origin=origin, comm_of=comm_owner(name, backends)
        )
        with _lock:
            broken = _entry_point_errors.get(key)
        if broken is not None:
            err = BackendNotFoundError(f"{err}; its plugin failed to load: {broken}")
        raise err
    return backends[key]


@dataclass(frozen=True)
class Selection:
    """The outcome of :func:`select_backend`: which backend, and why."""

    backend: BoundBackend
    reason: str
    skipped: tuple[tuple[str, str], ...] = ()


def select_backend(name: str | None = None, env: Mapping[str, str] | None = None) -> Selection:
    """Choose a backend: argument > ``DEVLAYER_BACKEND`` > auto-detection.

    Args:
        name: An explicit backend name (wins over the environment); ``None`` or ``"auto"``
            defer to ``DEVLAYER_BACKEND``, then auto-detection.
        env: The environment to read ``DEVLAYER_BACKEND`` from (default ``os.environ``).

    Returns:
        The chosen backend and a sentence saying why.

    Raises:
        BackendNotFoundError: The name (or ``DEVLAYER_BACKEND``) is not registered.
        BackendUnavailableError: An explicitly chosen backend cannot run here; there is
            no silent fallback to another vendor.
    """
    settings = Settings.from_env(os.environ if env is None else env, ("backend",))
    settings = settings.given("backend", name)
    return choose_backend(settings.backend, settings.origin("backend"))


def choose_backend(name: object, origin: str = "backend") -> Selection:
    """Choose the backend ``name`` (from ``origin``), or auto-detect one when it is ``None``.

    Args:
        name: A backend name, or ``None`` (the :class:`~devlayer.config.Settings` value
            for ``"auto"``) to auto-detect.
        origin: Where the name came from (``backend``, ``DEVLAYER_BACKEND``), for messages.

    Raises:
        InvalidArgumentError: A name that is not a string.
        BackendNotFoundError: The name is not registered.
        BackendUnavailableError: The named backend cannot run here (no silent fallback).

    Example:
        >>> choose_backend("CPU", "DEVLAYER_BACKEND").reason
        "DEVLAYER_BACKEND='CPU'"
    """
    if name is not None and not isinstance(name, str):
        raise InvalidArgumentError(
            f"{origin}={short_repr(name)} has type {type(name).__name__}; pass a backend name "
            f"({', '.join(registered_backends())}), or None for auto-detection"
        )
    if name is not None:
        backend = get_backend(name, origin=origin)
        avail = _safe_availability(backend)
        if not avail:
            undo = "unset DEVLAYER_BACKEND" if origin == "DEVLAYER_BACKEND" else "pass backend=None"
            raise BackendUnavailableError(
                f"{origin}={name!r} was requested but cannot run here: {avail.reason}. "
                f"{backend.hint()} Or {undo} to auto-detect (cpu when nothing else)."
            )
        return Selection(backend, f"{origin}={name!r}")
    skipped: list[tuple[str, str]] = []
    for bname, backend in registered_backends().items():
        avail = _safe_availability(backend)
        if avail:
            why = f"auto-detected: {avail.reason}"
            if skipped:
                why += " (" + "; ".join(f"{n}: {r}" for n, r in skipped) + ")"
            return Selection(backend, why, tuple(skipped))
        skipped.append((bname, avail.reason))
    raise BackendUnavailableError(
        "no backend is available: " + "; ".join(f"{n}: {r}" for n, r in skipped)
    )


def _simulation_defaults(vendor: str) -> dict[str, Any]:
    """A simulated ``vendor``'s visibility variables and comm backends, from its backend.

    The visibility variables are the backend's own; the comm backends are the one torch
    maps its device type to, and gloo (``cuda`` -> nccl + gloo, ``mps`` -> gloo).
    """
    _ensure_loaded()
    with _lock:  # the registered backend itself: binding it would ask the simulation again
        backend = _backends.get(vendor)
    if backend is None:
        return {}
    comm = torch_default_comm(backend.device_type)
    return {
        "visibility_var": backend.visibility_vars or None,
        "comm": tuple(dict.fromkeys((comm, "gloo"))),
    }


# Only the backends know their vendors' defaults; the simulation (a leaf module) asks here.
simulation.use_vendor_defaults(_simulation_defaults)
