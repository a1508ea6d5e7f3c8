"""A toy backend plugin: one device, the CPU, under its own name (priority below cpu's 0).

Example:
    >>> import devlayer
    >>> devlayer.backends.register_backend(ToyBackend).name
    'toy'
    >>> with devlayer.init(backend="toy") as st:
    ...     (st.backend, str(st.device))
    ('toy', 'cpu')
    >>> devlayer.backends.unregister_backend("toy")
"""

import devlayer


class ToyRuntime(devlayer.backends.Runtime):
    """The hardware seam: what a real vendor asks its torch module (one device here)."""

    # fmt: off
    def compiled(self) -> bool: return True
    def device_count(self) -> int: return 1
    def comm_available(self, comm: str) -> bool: return comm == "gloo"
    # fmt: on


class ToyBackend(devlayer.backends.Backend):
    """A CPU device (torch maps it to gloo); select it with ``DEVLAYER_BACKEND=toy``."""

    name, priority, device_type = "toy", -10, "cpu"

    def make_runtime(self) -> ToyRuntime:
        return ToyRuntime()
