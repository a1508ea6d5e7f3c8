"""A toy devlayer backend plugin: one device, which is the CPU.

It shows the whole vendor interface a plugin needs: a :class:`devlayer.backends.Backend` subclass
with a name, a priority, a torch device type and a runtime (the hardware seam). Its
priority is below the built-in ``cpu`` (0), so auto-detection never picks it; select it
with ``devlayer.init(backend="toy")`` or ``DEVLAYER_BACKEND=toy``.

Example:
    >>> import devlayer
    >>> devlayer.backends.register_backend(ToyBackend).name
    'toy'
    >>> with devlayer.init(backend="toy") as st:
    ...     (st.backend, str(st.device))
    ('toy', 'cpu')
    >>> devlayer.backends.unregister_backend("toy")
"""

from __future__ import annotations

import devlayer

__all__ = ["ToyBackend", "ToyRuntime"]


class ToyRuntime:
    """The runtime a real vendor would implement by asking its torch module."""

    variant = ""

    def compiled(self) -> bool:
        """The toy device needs no special torch build."""
        return True

    def device_count(self) -> int:
        """Exactly one device: the CPU."""
        return 1

    def is_initialized(self) -> bool:
        """Nothing to initialize, so visibility can never be frozen."""
        return False

    def set_device(self, index: int) -> None:
        """Only device 0 exists."""
        if index != 0:
            raise RuntimeError(f"toy has one device; got index {index}")

    def device_name(self, index: int) -> str:
        """A human name for the device."""
        return "Toy CPU device"

    def comm_available(self, comm: str) -> bool:
        """The toy device talks over gloo, like the CPU."""
        return comm == "gloo"


class ToyBackend(devlayer.backends.Backend):
    """A backend that runs on the CPU under its own name."""

    name = "toy"
    priority = -10  # below cpu (0): never chosen by auto-detection
    device_type = "cpu"
    indexed = False  # one shared device, no per-rank index (like the built-in cpu)

    def make_runtime(self) -> ToyRuntime:
        """Build the runtime (called once, lazily; tests may simulate it instead)."""
        return ToyRuntime()

    def default_comm(self) -> str:
        """Process groups of toy ranks use gloo."""
        return "gloo"
