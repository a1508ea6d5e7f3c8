"""Simulated devices: fake vendor runtimes behind the one hardware seam.

Simulation is a production feature: ``DEVLAYER_SIMULATE="cuda:4"`` makes ``devlayer info``,
``init()`` and the CLI behave as on a machine with four CUDA devices (no kernels run), so
selection, device mapping, visibility and error paths can be shown and tested anywhere.
The registry asks :func:`runtime_for` when a lookup binds a backend to its runtime;
``devlayer.testing.simulate`` installs fakes for one ``with`` block through :func:`install`.

Nothing here imports torch or the registry.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from devlayer.errors import InvalidArgumentError

__all__ = [
    "FakeRuntime",
    "fake_for",
    "install",
    "installed",
    "reset",
    "runtime_for",
    "runtimes_from_spec",
    "use_vendor_defaults",
]


class FakeRuntime:
    """A vendor runtime with ``device_count`` pretend devices.

    Args:
        device_count: Physical devices. Once a visibility variable is set, the runtime
            reports only the entries of it that name one of these (see ``visibility_var``).
        comm: Process-group backends it claims (:func:`fake_for`: the vendor's usual ones).
        compiled: Whether torch "was built" with this vendor.
        initialized: Whether the runtime "was already initialized".
        variant: A build flavour the backend may ask about (the cuda backend: ``"rocm"``
            for a HIP build of torch).
        names: Device names; defaults to ``Simulated <VENDOR> <i>``.
        visibility_var: When set, the count follows this variable's entries once it is set,
            as a real runtime would after devlayer narrows visibility. With a sequence of
            names (a backend's ``visibility_vars``), every one that is set applies, from the
            last to the first, each to the devices the ones after it left: the first, the
            one devlayer narrows, applies on top (as ROCm applies ``ROCR_VISIBLE_DEVICES``,
            then ``HIP_VISIBLE_DEVICES``, then ``CUDA_VISIBLE_DEVICES``).

    Attributes:
        current: The index passed to the last ``set_device`` call (``None`` before).
        calls: Every call made, in order, for assertions.
    """

    def __init__(
        self,
        device_count: int,
        *,
        comm: Iterable[str] = ("gloo",),
        compiled: bool = True,
        initialized: bool = False,
        variant: str = "",
        names: Iterable[str] | None = None,
        vendor: str = "fake",
        visibility_var: str | Iterable[str] | None = None,
    ) -> None:
        self.count = device_count
        self.comm = set(comm)
        self._compiled = compiled
        self.initialized = initialized
        self.variant = variant
        self.vendor = vendor
        self.names = list(names) if names is not None else None
        if isinstance(visibility_var, str):
            visibility_var = (visibility_var,)
        self.visibility_vars: tuple[str, ...] = tuple(visibility_var or ())
        #: The first visibility variable (kept for callers that read one name).
        self.visibility_var = self.visibility_vars[0] if self.visibility_vars else None
        self.simulated = True
        #: Never pass ``device_id`` to ``init_process_group``: no real device to bind.
        self.bind_device_id = False
        self.current: int | None = None
        self.calls: list[tuple[str, object]] = []

    def compiled(self) -> bool:
        return self._compiled

    def device_count(self) -> int:
        if not self._compiled:
            return 0
        visible = self.count
        for var in reversed(self.visibility_vars):
            if var in os.environ:
                # A real runtime drops entries that do not exist (CUDA stops at the first).
                entries = [e for e in os.environ[var].strip().split(",") if e.strip()]
                seen = 0
                for entry in entries:
                    head = entry.split(".")[0]
                    if head.isdigit() and int(head) >= visible:
                        break
                    seen += 1
                visible = seen
        return visible

    def is_initialized(self) -> bool:
        return self.initialized

    def set_device(self, index: int) -> None:
        if not 0 <= index < self.device_count():
            raise RuntimeError(f"invalid device ordinal {index}")
        self.calls.append(("set_device", index))
        self.current = index
        self.initialized = True

    def device_name(self, index: int) -> str:
        if self.names is not None:
            return self.names[index]
        return f"Simulated {self.vendor.upper()} {index}"

    def comm_available(self, comm: str) -> bool:
        return comm in self.comm

    def __repr__(self) -> str:
        return f"FakeRuntime({self.vendor}, devices={self.count}, comm={sorted(self.comm)})"


_vendor_defaults: Callable[[str], Mapping[str, Any]] | None = None


def use_vendor_defaults(defaults: Callable[[str], Mapping[str, Any]] | None) -> None:
    """Say where :func:`fake_for` finds a vendor's defaults (``visibility_var``, ``comm``).

    :mod:`devlayer.registry` installs its own on import: only the backends know their
    vendors' visibility variables and comm backends; this module stays vendor-neutral.
    """
    global _vendor_defaults
    _vendor_defaults = defaults


def fake_for(
    vendor: str, count: int, *, comm: Iterable[str] | None = None, **kwargs: object
) -> FakeRuntime:
    """A :class:`FakeRuntime` with the usual comm backends and visibility vars of ``vendor``.

    The defaults come from the registered backend called ``vendor`` (its visibility
    variables; the comm backend torch maps its device type to, and gloo). An unknown
    vendor gets gloo and no visibility variable.
    """
    defaults = _vendor_defaults(vendor) if _vendor_defaults is not None else {}
    kwargs.setdefault("visibility_var", defaults.get("visibility_var"))
    return FakeRuntime(
        count,
        comm=comm if comm is not None else defaults.get("comm", ("gloo",)),
        vendor=vendor,
        **kwargs,  # type: ignore[arg-type]
    )


@functools.lru_cache(maxsize=8)
def _parse_spec(spec: str) -> tuple[tuple[str, int, tuple[str, ...]], ...]:
    out = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        vendor, _, rest = part.partition(":")
        count_text, _, comm_text = rest.partition(":")
        try:
            count = int(count_text or "1")
        except ValueError:
            raise InvalidArgumentError(
                f"DEVLAYER_SIMULATE={spec!r}: {count_text!r} is not a device count; "
                f"use e.g. '{vendor.strip()}:4' or '{vendor.strip()}:2:gloo'"
            ) from None
        comm = tuple(c for c in comm_text.split("+") if c)
        out.append((vendor.strip().lower(), count, comm))
    return tuple(out)


_runtime_cache: dict[str, dict[str, FakeRuntime]] = {}


def runtimes_from_spec(spec: str) -> dict[str, FakeRuntime]:
    """Fake runtimes from ``DEVLAYER_SIMULATE`` (``"cuda:4"``, ``"xpu:2:ccl+gloo"``).

    The same spec string returns the same objects, so state survives between calls.
    """
    if spec not in _runtime_cache:
        _runtime_cache[spec] = {
            vendor: fake_for(vendor, count, comm=comm or None)
            for vendor, count, comm in _parse_spec(spec)
        }
    return _runtime_cache[spec]


def reset() -> None:
    """Forget fakes made from ``DEVLAYER_SIMULATE`` (their recorded state included)."""
    _runtime_cache.clear()


_lock = threading.RLock()
_installed: dict[str, Any] = {}


def install(name: str, runtime: Any | None) -> Any | None:
    """Make backend ``name`` use ``runtime`` (``None`` removes it); returns the previous one."""
    with _lock:
        previous = _installed.get(name)
        if runtime is None:
            _installed.pop(name, None)
        else:
            _installed[name] = runtime
        return previous


def installed(name: str) -> Any | None:
    """The fake installed for backend ``name`` by :func:`install`, if any."""
    return _installed.get(name)


def runtime_for(name: str, spec: str | None) -> Any | None:
    """The simulated runtime backend ``name`` should use: an installed fake, else one from
    ``spec`` (the ``DEVLAYER_SIMULATE`` setting), else ``None`` (use the real runtime)."""
    fake = _installed.get(name)
    if fake is not None:
        return fake
    return runtimes_from_spec(spec).get(name) if spec else None
