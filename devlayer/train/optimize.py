"""Named model optimizations for ``Trainer(optimize="name")``: the training layer's hook.

A name maps to a function ``fn(model, optimizer, *, backend, dtype) -> (model, optimizer)``
that runs once, after the model is on its device and before DDP wraps it; ``backend`` is
the selected :class:`devlayer.backends.BoundBackend` and ``dtype`` the mixed-precision dtype
(``torch.float32`` without autocast). A function may raise
:class:`~devlayer.errors.InvalidArgumentError` when the backend is not one it serves.

The built-in ``"ipex"`` (``ipex.optimize``) lives with the Intel vendor code and is imported
only when asked for. Add your own with :func:`register_optimization`.

Example:
    >>> from devlayer.train.optimize import OPTIMIZATIONS
    >>> sorted(OPTIMIZATIONS)
    ['ipex']
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import devlayer
from devlayer.errors import InvalidArgumentError

__all__ = ["OPTIMIZATIONS", "apply_optimization", "register_optimization"]

#: Optimization name -> function, or ``"module:function"`` imported on first use.
OPTIMIZATIONS: dict[str, str | Callable[..., tuple[Any, Any]]] = {
    "ipex": "devlayer.backends._ipex:trainer_optimize",
}


def register_optimization(
    name: str, fn: Callable[..., tuple[Any, Any]], *, replace: bool = False
) -> None:
    """Make ``Trainer(optimize=name)`` call ``fn(model, optimizer, *, backend, dtype)``.

    Raises:
        InvalidArgumentError: ``name`` is taken and ``replace`` is False.
    """
    if name in OPTIMIZATIONS and not replace:
        raise InvalidArgumentError(
            f"an optimization named {name!r} is already registered; pass replace=True to replace it"
        )
    OPTIMIZATIONS[name] = fn


def _resolve(name: str) -> Callable[..., tuple[Any, Any]] | None:
    target = OPTIMIZATIONS.get(name)
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = OPTIMIZATIONS[name] = getattr(importlib.import_module(module), attr)
    return target


def apply_optimization(
    name: str,
    model: Any,
    optimizer: Any,
    *,
    backend: str,
    dtype: Any,
) -> tuple[Any, Any]:
    """Run the optimization called ``name`` for the backend called ``backend``.

    Args:
        name: The name the user passed, e.g. ``"ipex"``.
        model: The module, already on the backend's device.
        optimizer: Its optimizer (or None).
        backend: The selected backend's name.
        dtype: ``torch.bfloat16``/``torch.float16`` under mixed precision, else
            ``torch.float32``.

    Returns:
        ``(model, optimizer)`` to train with.

    Raises:
        InvalidArgumentError: No optimization has that name, or it does not serve this
            backend.
    """
    be = devlayer.backends.get_backend(backend)
    fn = _resolve(name)
    if fn is None:
        known = ", ".join(repr(k) for k in sorted(OPTIMIZATIONS))
        raise InvalidArgumentError(
            f"optimize={name!r} is not available on backend {backend!r}: no optimization of "
            f"that name (known: {known}); pass a callable (model, optimizer) -> "
            f"(model, optimizer), register one with "
            f"devlayer.train.optimize.register_optimization, or leave optimize=None"
        )
    return fn(model, optimizer, backend=be, dtype=dtype)
