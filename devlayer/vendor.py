"""The vendor contract: what a device vendor defines to plug into devlayer.

A vendor subclasses :class:`Backend` (twelve public names, three of them required) and gives
it a :class:`Runtime`, the one object through which it asks torch about its devices (the
*hardware seam* that :mod:`devlayer.simulation` replaces). Nothing else: what the library
derives from a backend (its device count, ``set_device``, the ``torch.device``, the checked
comm backend...) lives on :class:`devlayer.registry.BoundBackend`, which the registry builds
at each lookup with the runtime in use, simulated or real.

This module imports neither torch nor a vendor module.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    from devlayer.launchers import ProcessInfo

__all__ = [
    "RUNTIME_MEMBERS",
    "Availability",
    "Backend",
    "Runtime",
    "missing_runtime_members",
]


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run here, with the reason in words.

    Example:
        >>> bool(Availability(False, "torch built without CUDA"))
        False
    """

    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


@runtime_checkable
class Runtime(Protocol):
    """What a backend asks of its vendor runtime: the single seam simulation replaces.

    A runtime may subclass this protocol to inherit defaults: the declared attributes below,
    ``is_initialized()`` False and ``device_name(i)`` a generic name, right for a device with
    nothing to initialize. ``compiled``, ``device_count`` and (for a backend with
    ``visibility_vars``, whose ranks pick an index) ``set_device`` have none. A runtime may
    also define ``comm_available(comm) -> bool`` when torch cannot tell by itself (oneCCL's
    ``ccl`` before its bindings are imported); simulated runtimes define it to fake
    ``nccl``/``xccl``. Without it, torch is asked.

    Attributes:
        variant: The build flavour, ``""`` when the vendor has one (the cuda backend's
            runtime says ``"rocm"`` for a HIP build of torch).
        bind_device_id: Pass ``device_id`` to ``init_process_group`` (eager comm init on
            the device; cuda). Simulated runtimes never bind.

    Example:
        >>> class OneDevice(Runtime):
        ...     def compiled(self): return True
        ...     def device_count(self): return 1
        >>> (OneDevice().variant, OneDevice().bind_device_id, OneDevice().device_count())
        ('', False, 1)
    """

    variant: str = ""
    bind_device_id: bool = False

    def compiled(self) -> bool:
        """True when torch was built with this vendor's support."""
        raise NotImplementedError(f"{type(self).__name__} defines no compiled()")

    def device_count(self) -> int:
        """Visible devices, asked without initializing the runtime where the vendor allows."""
        raise NotImplementedError(f"{type(self).__name__} defines no device_count()")

    def is_initialized(self) -> bool:
        """True once the vendor runtime has read its visibility variables."""
        return False

    def set_device(self, index: int) -> None:
        """Make ``index`` the current device of this process."""
        raise NotImplementedError(f"{type(self).__name__} defines no set_device()")

    def device_name(self, index: int) -> str:
        """A human name for device ``index`` (e.g. ``NVIDIA H100 80GB HBM3``)."""
        return f"device {index}"


#: Every member of :class:`Runtime` (the declared attributes, then the methods).
RUNTIME_MEMBERS = (
    "variant",
    "bind_device_id",
    "compiled",
    "device_count",
    "is_initialized",
    "set_device",
    "device_name",
)


def missing_runtime_members(runtime: object) -> list[str]:
    """The members of :class:`Runtime` that ``runtime`` lacks.

    Example:
        >>> missing_runtime_members(object())[:2]
        ['variant', 'bind_device_id']
    """
    return [m for m in RUNTIME_MEMBERS if not hasattr(runtime, m)]


class Backend:
    """One device vendor. Subclass it in one file; register it with one line.

    ``name``, ``device_type`` and :meth:`make_runtime` are required; the rest have working
    defaults. Callers never use this class directly: the registry hands them a
    :class:`devlayer.registry.BoundBackend` that joins it to its runtime.

    Attributes:
        name: Registry key and the value of ``DEVLAYER_BACKEND``.
        priority: Auto-detection order; higher is tried first.
        device_type: The torch device type (``"cuda"``, ``"xpu"``, ``"cpu"``...).
        visibility_vars: Environment variables that restrict visible devices; the first is
            the one devlayer narrows. Devices have indices (each rank picks one) exactly
            when there is such a variable.
        comms: Process-group backends in order of preference: the first torch has is the
            default. ``None``: torch's own for ``device_type``. ``()``: none carries this
            device's tensors, so one process only (mps).
        exclusive_comms: Process-group backends that refuse two ranks on one device
            (cuda: ``nccl``); ``init()`` then refuses more ranks per node than devices
            unless ``DEVLAYER_ALLOW_SHARED_DEVICES=1``, and only warns for the others.

    Example:
        >>> class MyNpu(Backend):
        ...     name, priority, device_type = "mynpu", 80, "mynpu"
        >>> MyNpu.name
        'mynpu'
    """

    name: ClassVar[str] = ""
    priority: ClassVar[int] = 0
    device_type: ClassVar[str] = ""
    visibility_vars: ClassVar[tuple[str, ...]] = ()
    comms: ClassVar[tuple[str, ...] | None] = None
    exclusive_comms: ClassVar[tuple[str, ...]] = ()

    def make_runtime(self) -> Runtime:
        """Build the real runtime that asks torch; the registry calls it once, lazily."""
        raise NotImplementedError(f"backend {self.name!r} defines no runtime")

    def availability(self, runtime: Runtime) -> Availability:
        """Can this backend run here, asked of ``runtime`` without initializing it?"""
        if not runtime.compiled():
            return Availability(False, f"torch built without {self.device_type.upper()}")
        count = runtime.device_count()
        if count < 1:
            return Availability(False, f"no {self.device_type.upper()} devices visible")
        return Availability(True, f"{count} {self.device_type} device(s)")

    def prepare(
        self,
        comm: str,
        process: ProcessInfo | None = None,
        env: MutableMapping[str, str] | None = None,
    ) -> None:
        """Work before the process group for ``comm`` exists: variables, then imports.

        Args:
            comm: The process-group backend about to be created.
            process: This rank's launcher facts (local rank and size...).
            env: Where to set variables the comm library reads, with ``env.setdefault``
                (a user's value wins); ``init()`` passes a view of ``os.environ`` that
                ``shutdown()`` restores. Set them before importing the library.
        """

    def hint(self, comm: str | None = None) -> str:
        """What to install or check: for this backend, or for a missing comm backend ``comm``."""
        if comm is None:
            return f"Check that torch was built with {self.device_type} support."
        return f"install a torch build with {comm} support, or choose another comm backend"

    def notes(self, env: Mapping[str, str], *, selected: bool) -> list[str]:
        """Known pitfalls of this vendor for ``devlayer info`` (pure; no runtime calls)."""
        return []

    def visibility_var(self, env: Mapping[str, str], runtime: Runtime) -> str | None:
        """The variable to narrow (``None`` = cannot restrict); ``runtime.variant`` may decide."""
        return self.visibility_vars[0] if self.visibility_vars else None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} name={self.name!r} priority={self.priority}>"
