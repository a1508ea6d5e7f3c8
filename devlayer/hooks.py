"""Accelerator hooks: hand torch's device module to libraries that keep their own.

Pty-Chi and similar projects ask users to call ``set_torch_accelerator_module(torch.xpu)``
by hand; ``init(accelerator_hooks=...)`` or ``DEVLAYER_ACCELERATOR_HOOKS`` do it with the
module of the device type devlayer chose, so the script names no vendor.

Two tables a vendor fills when its backend module is imported are here too, below both
their writers and their readers, so that no module outside ``backends/`` names a vendor:

- the named model optimizations (``Trainer(optimize="name")``; ``backends/_ipex.py``
  registers ``"ipex"``), which :mod:`devlayer.train.optimize` looks up;
- the network variables of each vendor's comm library (:data:`COMM_NETWORKS`), which
  ``devlayer doctor`` names when a collective fails;
- torch's flight recorder of a comm backend (:data:`FLIGHT_RECORDERS`), which ``init()``
  turns on for the hang reports (:mod:`devlayer.hangdump`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from devlayer.errors import DevlayerError, InvalidArgumentError

if TYPE_CHECKING:
    from types import ModuleType

    from devlayer.registry import BoundBackend

__all__ = [
    "COMM_NETWORKS",
    "FLIGHT_RECORDERS",
    "OPTIMIZATIONS",
    "AcceleratorHook",
    "CommNetwork",
    "FlightRecorder",
    "Optimization",
    "as_hook_list",
    "call_hooks",
    "register_comm_network",
    "register_flight_recorder",
    "register_optimization",
    "resolve_hooks",
    "torch_module",
]


#: ``hook(module)`` for libraries that keep their own "accelerator module" (torch.cuda,
#: torch.xpu...), or ``"package.module:function"`` naming one.
AcceleratorHook = Callable[[Any], object] | str

#: ``fn(model, optimizer, *, backend, dtype) -> (model, optimizer)``: a named optimization.
Optimization = Callable[..., tuple[Any, Any]]

#: Optimization name -> function, for ``Trainer(optimize="name")``. Empty until the backend
#: modules load; each vendor registers its own then.
OPTIMIZATIONS: dict[str, Optimization] = {}


def register_optimization(name: str, fn: Optimization, *, replace: bool = False) -> None:
    """Put ``fn`` in :data:`OPTIMIZATIONS` under ``name``.

    Vendors call it when their backend module is imported; users call
    :func:`devlayer.train.optimize.register_optimization`, which loads the vendors first.

    Args:
        name: What users pass as ``Trainer(optimize=name)``.
        fn: ``fn(model, optimizer, *, backend, dtype) -> (model, optimizer)``.
        replace: Replace a function already registered under ``name``.

    Raises:
        InvalidArgumentError: ``name`` is taken and ``replace`` is False.

    Example:
        >>> register_optimization("noop", lambda m, o, **kw: (m, o))
        >>> OPTIMIZATIONS.pop("noop")(1, 2, backend=None, dtype=None)
        (1, 2)
    """
    if name in OPTIMIZATIONS and not replace:
        raise InvalidArgumentError(
            f"an optimization named {name!r} is already registered; pass replace=True to replace it"
        )
    OPTIMIZATIONS[name] = fn


@dataclass(frozen=True)
class CommNetwork:
    """The variables that steer a comm library's network, for ``devlayer doctor``'s hints.

    Attributes:
        prefix: The prefix of all the library's variables (shown as ``prefix*``).
        interface: The variable that picks the network interface, or None.
    """

    prefix: str
    interface: str | None = None


#: Comm backend name -> its library's network variables, registered by the vendor that
#: ships it when its backend module is imported.
COMM_NETWORKS: dict[str, CommNetwork] = {}


def register_comm_network(comm: str, network: CommNetwork) -> None:
    """Declare the network variables of comm backend ``comm`` (the last declaration wins).

    Example:
        >>> register_comm_network("mycomm", CommNetwork("MYCOMM_", "MYCOMM_IFNAME"))
        >>> COMM_NETWORKS.pop("mycomm").interface
        'MYCOMM_IFNAME'
    """
    COMM_NETWORKS[comm] = network


def _is_off(value: str) -> bool:
    """A flag or size that turns a recorder setting off: ``0``, ``false``, ``no``, ``off``, < 0."""
    text = value.strip().lower()
    return text in ("0", "false", "no", "off") or text.startswith("-")


@dataclass(frozen=True)
class FlightRecorder:
    """torch's flight recorder of one comm backend: the variables that turn it on cheaply
    and the one that says where it writes its dump (torch appends the rank to it).

    Each variable is a tuple of the spellings torch reads, newest first: a user's value
    under any of them wins, and no other spelling is added beside it.

    Attributes:
        settings: ``(spellings, value)`` pairs: the cheap settings (buffer size, dump on
            timeout).
        file_vars: The spellings of the dump file's prefix.
        file_name: The prefix's name in the hang folder.

    Example:
        >>> fr = FlightRecorder(((("MY_FR_SIZE",), "2000"),), ("MY_FR_FILE",))
        >>> fr.settings_for("/hangs", {})
        {'MY_FR_SIZE': '2000', 'MY_FR_FILE': '/hangs/flight_recorder_rank_'}
        >>> fr.dump_path({"MY_FR_FILE": "/hangs/fr_"}, 1)
        '/hangs/fr_1'
    """

    settings: tuple[tuple[tuple[str, ...], str], ...]
    file_vars: tuple[str, ...]
    file_name: str = "flight_recorder_rank_"

    def settings_for(self, folder: str, env: Mapping[str, str]) -> dict[str, str]:
        """The variables to set (pure): each one of which no spelling is set in ``env``."""
        out = {names[0]: value for names, value in self.settings if not _set(names, env)}
        if not _set(self.file_vars, env):
            out[self.file_vars[0]] = f"{folder.rstrip('/')}/{self.file_name}"
        return out

    def dump_path(self, env: Mapping[str, str], rank: int) -> str | None:
        """Where torch writes rank ``rank``'s dump under ``env`` (pure); None when no file
        is named or a setting turns the recorder or its dump off."""
        prefix = _set(self.file_vars, env)
        if prefix is None or any(_is_off(_set(n, env) or "1") for n, _ in self.settings):
            return None
        return f"{prefix}{rank}"


def _set(names: tuple[str, ...], env: Mapping[str, str]) -> str | None:
    """The value of the first of ``names`` set in ``env`` (as torch reads them), or None."""
    return next((env[n] for n in names if n in env), None)


#: Comm backend name -> torch's flight recorder for it, registered by the vendor that ships
#: the comm backend when its backend module is imported.
FLIGHT_RECORDERS: dict[str, FlightRecorder] = {}


def register_flight_recorder(comm: str, recorder: FlightRecorder) -> None:
    """Declare torch's flight recorder of comm backend ``comm`` (the last declaration wins).

    Example:
        >>> register_flight_recorder("mycomm", FlightRecorder((), ("MYCOMM_FR_FILE",)))
        >>> FLIGHT_RECORDERS.pop("mycomm").file_vars
        ('MYCOMM_FR_FILE',)
    """
    FLIGHT_RECORDERS[comm] = recorder


def resolve_hooks(
    hooks: Iterable[AcceleratorHook], origin: str = "accelerator_hooks"
) -> list[tuple[str, Callable[[Any], object]]]:
    """``(name, callable)`` for each accelerator hook, importing ``"module:function"`` names.

    Args:
        hooks: The hooks asked for: the ``accelerator_hooks`` argument, else the entries of
            ``DEVLAYER_ACCELERATOR_HOOKS`` (:attr:`devlayer.config.Settings.accelerator_hooks`).
        origin: Where they came from, for messages.

    Raises:
        InvalidArgumentError: A name that is not ``module:function``, cannot be imported,
            or is not callable.

    Example:
        >>> [name for name, _ in resolve_hooks(["os:getcwd"], "DEVLAYER_ACCELERATOR_HOOKS")]
        ['os:getcwd']
        >>> resolve_hooks(())
        []
    """
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


def as_hook_list(hooks: Iterable[AcceleratorHook] | AcceleratorHook | None) -> list[Any] | None:
    """The hooks argument as a list (one hook may be passed bare); None stays None."""
    if hooks is None:
        return None
    if isinstance(hooks, str) or callable(hooks):
        return [hooks]
    return list(hooks)


def call_hooks(hooks: list[tuple[str, Callable[[Any], object]]], be: BoundBackend) -> None:
    if not hooks:
        return
    module = torch_module(be.device_type)
    for name, hook in hooks:
        try:
            hook(module)
        except Exception as exc:
            raise DevlayerError(
                f"accelerator hook {name} raised {type(exc).__name__}: {exc} (called with "
                f"{module.__name__}); fix the hook or remove it from accelerator_hooks / "
                f"DEVLAYER_ACCELERATOR_HOOKS"
            ) from exc


def torch_module(device_type: str) -> ModuleType:
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
