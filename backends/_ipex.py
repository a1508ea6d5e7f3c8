"""Intel Extension for PyTorch (IPEX): version check, import, and ``ipex.optimize``.

Shared by the ``cpu`` backend (IPEX's CPU wheel) and the ``xpu`` backend (IPEX for older
torch, with the oneCCL bindings). IPEX is an optional extra: nothing here imports it until
a caller asks for it, and every failure names the package, the versions seen and the fix.

IPEX is built for one torch minor release (IPEX 2.8.x needs torch 2.8.*). Importing a
mismatched IPEX prints its own complaint and may abort the interpreter, so the version is
checked from the installed package's metadata first.

IPEX is end of life (:data:`END_OF_LIFE`): stock torch runs Intel GPUs itself since 2.8
(``torch.xpu``, the ``xccl`` backend), which the xpu backend prefers. IPEX stays the path for
torch older than 2.8 and behind ``Trainer(optimize="ipex")``, which warns when used.
"""

from __future__ import annotations

import importlib
import warnings
from importlib import metadata
from typing import Any

from devlayer.errors import BackendUnavailableError, EndOfLifeWarning, InvalidArgumentError
from devlayer.hooks import OPTIMIZATIONS, register_optimization

IPEX_MODULE = "intel_extension_for_pytorch"
IPEX_DIST = "intel-extension-for-pytorch"

#: Why ``optimize="ipex"`` warns: Intel's announcement and the replacement.
END_OF_LIFE = (
    "Intel Extension for PyTorch is end of life: 2.8 was its last release, Intel ended its "
    "development on 2025-10-10 and archived the repository on 2026-03-30. Stock torch >= 2.8 "
    "runs Intel GPUs itself (torch.xpu, the xccl backend), which devlayer uses without IPEX; "
    "for fused kernels try Trainer(compile=True) instead of optimize='ipex' (docs/intel.md)"
)


def installed_version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, or None when it is not installed."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def minor(version: str) -> str:
    """``"2.8.10+xpu"`` -> ``"2.8"``.

    Example:
        >>> minor("2.8.10+xpu")
        '2.8'
    """
    return ".".join(version.split("+")[0].split(".")[:2])


def mismatch(ipex_version: str, torch_version: str) -> str | None:
    """Why IPEX ``ipex_version`` cannot run with torch ``torch_version``, or None if it can.

    Example:
        >>> mismatch("2.8.0", "2.8.0+cpu") is None
        True
        >>> print(mismatch("2.8.0", "2.13.0"))  # doctest: +NORMALIZE_WHITESPACE
        intel-extension-for-pytorch 2.8.0 does not match torch 2.13.0: IPEX 2.8.* needs
        torch 2.8.*; install intel-extension-for-pytorch==2.13.* (if released) or
        torch==2.8.*
    """
    if minor(ipex_version) == minor(torch_version):
        return None
    return (
        f"{IPEX_DIST} {ipex_version} does not match torch {torch_version}: IPEX "
        f"{minor(ipex_version)}.* needs torch {minor(ipex_version)}.*; install "
        f"{IPEX_DIST}=={minor(torch_version)}.* (if released) or torch=={minor(ipex_version)}.*"
    )


def import_ipex(purpose: str) -> Any:
    """Import IPEX after checking that it is installed and matches torch.

    Args:
        purpose: What needs IPEX, for the error text (e.g. ``"optimize='ipex'"``).

    Returns:
        The ``intel_extension_for_pytorch`` module.

    Raises:
        BackendUnavailableError: IPEX is not installed, does not match torch, or fails to
            import; the text names the versions and the install command.
    """
    import torch

    version = installed_version(IPEX_DIST)
    if version is None:
        raise BackendUnavailableError(
            f"{purpose} needs {IPEX_DIST}, which is not installed; for torch "
            f"{torch.__version__} install `pip install {IPEX_DIST}=={minor(torch.__version__)}.*` "
            f"if it has been released; IPEX is built for one torch minor version at a time, so "
            f"otherwise install the torch release your IPEX needs (see docs/intel.md)"
        )
    why = mismatch(version, torch.__version__)
    if why is not None:
        raise BackendUnavailableError(f"{purpose}: {why}")
    try:
        return importlib.import_module(IPEX_MODULE)
    except ImportError as exc:  # installed (metadata found) but unimportable
        raise BackendUnavailableError(
            f"{purpose} imports {IPEX_MODULE} ({IPEX_DIST} {version} is installed), and that "
            f"import failed: {exc}; reinstall {IPEX_DIST}=={minor(torch.__version__)}.* for "
            f"torch {torch.__version__}"
        ) from exc


def optimize(model: Any, optimizer: Any, dtype: Any) -> tuple[Any, Any]:
    """``ipex.optimize`` in place: operator fusion, weight layout and a fused optimizer step.

    Args:
        model: The module, already on its device (IPEX optimizes for the device it is on).
        optimizer: Its optimizer, or None for inference.
        dtype: ``torch.bfloat16`` / ``torch.float16`` under mixed precision, else
            ``torch.float32``.

    Returns:
        ``(model, optimizer)`` as IPEX returns them. The module is optimized in place
        (``inplace=True``), so the caller's object still ends up with the trained weights.
    """
    ipex = import_ipex("optimize='ipex'")
    if optimizer is None:
        return ipex.optimize(model, dtype=dtype, inplace=True), None
    out_model, out_opt = ipex.optimize(model, optimizer=optimizer, dtype=dtype, inplace=True)
    return out_model, out_opt


#: The device types IPEX has builds for.
DEVICE_TYPES = ("cpu", "xpu")


def trainer_optimize(model: Any, optimizer: Any, *, backend: Any, dtype: Any) -> tuple[Any, Any]:
    """``Trainer(optimize="ipex")``: :func:`optimize` on the cpu and xpu backends.

    Registered as ``"ipex"`` when this module is imported (by the cpu and xpu backends,
    which the registry loads before any optimization is looked up).

    Warns:
        EndOfLifeWarning: Always: IPEX is end of life (:data:`END_OF_LIFE`).

    Raises:
        InvalidArgumentError: The backend's device is one IPEX has no build for.
    """
    if backend.device_type not in DEVICE_TYPES:
        raise InvalidArgumentError(
            f"optimize='ipex' is not available on backend {backend.name!r}; 'ipex' works on "
            f"the cpu and xpu backends, or pass a callable (model, optimizer) -> "
            f"(model, optimizer), or leave optimize=None"
        )
    warnings.warn(END_OF_LIFE, EndOfLifeWarning, stacklevel=2)
    return optimize(model, optimizer, dtype)


if "ipex" not in OPTIMIZATIONS:  # one registered by hand before the vendors loaded wins
    register_optimization("ipex", trainer_optimize)
