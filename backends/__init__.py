"""Built-in vendor backends, one file each (installed as ``devlayer.backends``), and the registry.

Only modules in this package touch ``torch.cuda``, ``torch.xpu``, ``torch.mps``, IPEX or
oneCCL; a test enforces it. To add a vendor, add one file with a
:class:`devlayer.backends.Backend` subclass and one line to ``devlayer.registry.BUILTINS``
(or ship it as a plugin through the ``devlayer.backends`` entry-point group).

The vendor contract (``Backend``, ``Runtime``, ``Availability``, from :mod:`devlayer.vendor`)
and the registry's public names are here too, loaded on first use (importing this package
imports neither torch nor a vendor module):

Example:
    >>> import devlayer.backends
    >>> "cpu" in devlayer.backends.registered_backends()
    True
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from devlayer.registry import (
        BoundBackend,
        available_backends,
        get_backend,
        register_backend,
        registered_backends,
        unregister_backend,
    )
    from devlayer.vendor import Availability, Backend, Runtime

#: The names this package re-exports: the contract's, then the registry's.
_CONTRACT = ("Availability", "Backend", "Runtime")
__all__ = [
    "Availability",
    "Backend",
    "BoundBackend",
    "Runtime",
    "available_backends",
    "get_backend",
    "register_backend",
    "registered_backends",
    "unregister_backend",
]


def __getattr__(name: str) -> Any:
    # PEP 562: importing this package (as every vendor module does) must stay light,
    # so the registry (and through it the vendors) loads only when one of its names is used.
    if name not in __all__:
        raise AttributeError(f"module 'devlayer.backends' has no attribute {name!r}")
    home = "devlayer.vendor" if name in _CONTRACT else "devlayer.registry"
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
