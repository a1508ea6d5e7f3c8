"""``Trainer(compile=True)``: ``torch.compile`` with a toolchain check and a clear error.

``torch.compile`` (TorchInductor) generates code for the device: C++ for CPUs, Triton for
GPUs. Where that toolchain is missing, the failure surfaces at the first training step as
a long inductor traceback. :func:`compile_model` instead compiles and runs a tiny function
on the device first and, when that fails, raises :class:`~devlayer.errors.DevlayerError`
saying what is missing and how to go on.

Example:
    >>> compile_options(True)
    {}
    >>> compile_options({"mode": "reduce-overhead"})
    {'mode': 'reduce-overhead'}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from devlayer.errors import DevlayerError, InvalidArgumentError

__all__ = ["check_toolchain", "compile_model", "compile_options"]


def compile_options(compile: bool | Mapping[str, Any]) -> dict[str, Any] | None:
    """``torch.compile`` keyword arguments for ``Trainer(compile=...)``; ``None``: eager.

    Raises:
        InvalidArgumentError: ``compile`` is neither a bool nor a mapping of options.
    """
    if compile is False:
        return None
    if compile is True:
        return {}
    if isinstance(compile, Mapping):
        return dict(compile)
    raise InvalidArgumentError(
        f"compile={compile!r}: use True, False or a dict of torch.compile options "
        "(e.g. {'mode': 'max-autotune'})"
    )


def check_toolchain(device: Any, backend: str = "inductor") -> None:
    """Compile and run ``x * 2 + 1`` on ``device``; raise a clear error when that fails.

    Raises:
        DevlayerError: The compiler toolchain for ``device`` is missing or broken.
    """
    import torch

    probe = torch.compile(_probe, backend=backend, fullgraph=True, dynamic=False)
    try:
        out = probe(torch.ones(4, device=device))
        ok = bool((out == 3).all())
        why = "" if ok else f"the compiled probe returned {out.tolist()}"
    except Exception as exc:
        ok, why = False, _first_line(exc)
    if not ok:
        raise DevlayerError(
            f"torch.compile cannot build code for {device.type} devices here ({why}). "
            "TorchInductor needs a C++ compiler for CPU code (e.g. `apt install g++`, or "
            "set CXX) and Triton for GPU code (it ships with the GPU builds of torch). "
            "Install it, pass compile={'backend': 'aot_eager'} (no code generation), or "
            "compile=False (eager)"
        )


def _probe(x: Any) -> Any:
    return x * 2 + 1


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    head = next((line for line in lines if "Error" in line), lines[0] if lines else "")
    return f"{type(exc).__name__}: {head.strip()[:300]}" if head else type(exc).__name__


def compile_model(model: Any, options: Mapping[str, Any], device: Any) -> Any:
    """``torch.compile(model, **options)`` after :func:`check_toolchain` on ``device``."""
    import torch

    check_toolchain(device, str(options.get("backend", "inductor")))
    return torch.compile(model, **options)
