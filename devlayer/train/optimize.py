"""Named model optimizations for ``Trainer(optimize="name")``: the training layer's hook.

A name maps to a function ``fn(model, optimizer, *, backend, dtype) -> (model, optimizer)``
that runs once, after the model is on its device and before DDP wraps it; ``backend`` is
the selected :class:`devlayer.backends.BoundBackend` and ``dtype`` the mixed-precision dtype
(``torch.float32`` without autocast). A function may raise
:class:`~devlayer.errors.InvalidArgumentError` when the backend is not one it serves.

A vendor registers its own when its backend module loads (``"ipex"``, ``ipex.optimize``,
comes from ``backends/``); this module names no vendor. Add your own with
:func:`register_optimization`.

Example:
    >>> from devlayer.train.optimize import optimization_names
    >>> optimization_names()
    ['ipex']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import devlayer
from devlayer import hooks
from devlayer.errors import InvalidArgumentError
from devlayer.hooks import OPTIMIZATIONS, Optimization

__all__ = [
    "OPTIMIZATIONS",
    "apply_optimization",
    "optimization_names",
    "optimize_model",
    "register_optimization",
]


def _load_vendors() -> None:
    devlayer.backends.registered_backends()  # importing the backends registers their names


def optimization_names() -> list[str]:
    """The names ``Trainer(optimize=...)`` accepts, the vendors' included, sorted."""
    _load_vendors()
    return sorted(OPTIMIZATIONS)


def register_optimization(name: str, fn: Optimization, *, replace: bool = False) -> None:
    """Make ``Trainer(optimize=name)`` call ``fn(model, optimizer, *, backend, dtype)``.

    The vendors' names (``"ipex"``) are loaded first, so taking one needs ``replace=True``.

    Raises:
        InvalidArgumentError: ``name`` is taken and ``replace`` is False.
    """
    _load_vendors()
    hooks.register_optimization(name, fn, replace=replace)


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
    be = devlayer.backends.get_backend(backend)  # loads the vendors: their names too
    fn = OPTIMIZATIONS.get(name)
    if fn is None:
        known = ", ".join(repr(k) for k in sorted(OPTIMIZATIONS))
        raise InvalidArgumentError(
            f"optimize={name!r} is not available on backend {backend!r}: no optimization of "
            f"that name (known: {known}); pass a callable (model, optimizer) -> "
            f"(model, optimizer), register one with "
            f"devlayer.train.optimize.register_optimization, or leave optimize=None"
        )
    return fn(model, optimizer, backend=be, dtype=dtype)


def optimize_model(
    optimize: str | Callable[[Any, Any], tuple[Any, Any]],
    model: Any,
    optimizer: Any,
    *,
    device: Any,
    backend: str,
    dtype: Any,
) -> tuple[Any, Any]:
    """``Trainer(optimize=...)``: move ``model`` to ``device`` and optimize it, once.

    Args:
        optimize: A registered name (:func:`apply_optimization`) or a callable
            ``(model, optimizer) -> (model, optimizer)``.
        model: The module.
        optimizer: Its optimizer.
        device: The device the model is moved to first.
        backend: The selected backend's name.
        dtype: The autocast dtype, or ``None`` (``torch.float32`` is passed).

    Returns:
        ``(model, optimizer)`` to train with.

    Raises:
        InvalidArgumentError: The callable returned no ``(model, optimizer)`` tuple, or the
            model it returned is no ``torch.nn.Module``.
    """
    import torch

    model.to(device)
    if callable(optimize):
        result = optimize(model, optimizer)
        if not (isinstance(result, tuple) and len(result) == 2):
            raise InvalidArgumentError(
                f"optimize={optimize!r} returned {type(result).__name__}; it must "
                f"return a (model, optimizer) tuple"
            )
        model, optimizer = result
    else:
        model, optimizer = apply_optimization(
            str(optimize), model, optimizer, backend=backend, dtype=dtype or torch.float32
        )
    if not isinstance(model, torch.nn.Module):
        raise InvalidArgumentError(
            f"optimize={optimize!r} returned a {type(model).__name__} as the model; "
            f"expected a torch.nn.Module"
        )
    return model, optimizer
