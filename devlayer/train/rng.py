"""Random-number-generator state of every source a training step draws from.

Python's ``random``, NumPy's global generator, torch's CPU generator and the accelerator's
generator of this rank's device (asked through ``torch.get_device_module``, so no vendor is
named), captured in a form ``torch.load(weights_only=True)`` accepts, so a resumed run
draws exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import torch

import devlayer
from devlayer.errors import InvalidArgumentError
from devlayer.train.errors import CheckpointWarning

__all__ = ["is_rng_state", "rng_state", "set_rng_state"]


def _numpy() -> ModuleType | None:
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def _accelerator() -> torch.device | None:
    """This rank's accelerator when devlayer runs on one, else None."""
    if not devlayer.is_initialized():
        return None
    dev = devlayer.device()
    return None if dev.type == "cpu" else dev


def rng_state() -> dict[str, Any]:
    """Capture the random number generators of this process.

    Python's ``random``, NumPy's global generator (when NumPy is installed), torch's CPU
    generator and, when devlayer is initialized on an accelerator, that device's generator
    (through ``torch.get_device_module``). The result holds only tensors, ints, floats,
    strings, ``None``, tuples, lists and dicts, so it saves and loads with
    ``weights_only=True``.

    Returns:
        ``{"python": ..., "torch": ByteTensor, "numpy": {...}, "device": {...}}`` (the last
        two only when available).

    Example:
        >>> import torch
        >>> state = rng_state()
        >>> a = torch.rand(3)
        >>> set_rng_state(state)
        >>> torch.equal(torch.rand(3), a)
        True
    """
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": (version, tuple(internal), gauss),
        "torch": torch.get_rng_state(),
    }
    np = _numpy()
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state["numpy"] = {
            "bit_generator": str(name),
            "keys": [int(k) for k in keys],  # an ndarray would need a numpy safe global
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    dev = _accelerator()
    if dev is not None:
        module = torch.get_device_module(dev.type)
        if hasattr(module, "get_rng_state"):
            state["device"] = {"type": dev.type, "state": module.get_rng_state(dev).cpu()}
    return state


def _ints(value: object) -> bool:
    return isinstance(value, (list, tuple)) and all(
        isinstance(x, int) and not isinstance(x, bool) for x in value
    )


def _byte_tensor(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1


def _python_ok(value: object) -> bool:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        return False
    version, internal, gauss = value
    return isinstance(version, int) and _ints(internal) and (gauss is None or type(gauss) is float)


def _numpy_ok(value: object) -> bool:
    return (
        isinstance(value, Mapping)
        and isinstance(value.get("bit_generator"), str)
        and _ints(value.get("keys"))
        and all(isinstance(value.get(k), int) for k in ("pos", "has_gauss"))
        and isinstance(value.get("cached_gaussian"), (int, float))
    )


def is_rng_state(state: object) -> bool:
    """Whether ``state`` has the shape :func:`rng_state` gives (types only; a forged or
    damaged checkpoint is refused before :func:`set_rng_state` applies any part of it).

    Example:
        >>> is_rng_state(rng_state()), is_rng_state({"torch": "not a tensor"})
        (True, False)
    """
    if not isinstance(state, Mapping) or not set(state) <= {"python", "torch", "numpy", "device"}:
        return False
    device = state.get("device", {"type": "", "state": torch.zeros(0, dtype=torch.uint8)})
    return (
        ("python" not in state or _python_ok(state["python"]))
        and ("torch" not in state or _byte_tensor(state["torch"]))
        and ("numpy" not in state or _numpy_ok(state["numpy"]))
        and isinstance(device, Mapping)
        and isinstance(device.get("type"), str)
        and _byte_tensor(device.get("state"))
    )


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore generators captured by :func:`rng_state`.

    Parts that are missing are left alone. An accelerator state is restored only on the same
    device type; otherwise (e.g. resuming a GPU run on CPU) it is skipped with a
    :class:`CheckpointWarning`, as is a NumPy state when NumPy is not installed.

    Args:
        state: The dict from :func:`rng_state` (also after a save / load round trip, with
            tensors on any device).

    Raises:
        InvalidArgumentError: ``state`` is not a mapping.

    Example:
        >>> import random
        >>> s = rng_state(); x = random.random(); set_rng_state(s)
        >>> random.random() == x
        True
    """
    if not isinstance(state, Mapping):
        raise InvalidArgumentError(
            f"state is a {type(state).__name__}, expected the dict returned by rng_state()"
        )
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    if "numpy" in state:
        np = _numpy()
        if np is None:
            warnings.warn(
                "the RNG state holds a NumPy state but NumPy is not installed; skipped it",
                CheckpointWarning,
                stacklevel=2,
            )
        else:
            s = state["numpy"]
            np.random.set_state(
                (
                    s["bit_generator"],
                    np.asarray(s["keys"], dtype=np.uint32),
                    int(s["pos"]),
                    int(s["has_gauss"]),
                    float(s["cached_gaussian"]),
                )
            )
    if "device" in state:
        saved = state["device"]
        dev = _accelerator()
        if dev is None or dev.type != saved["type"]:
            here = "cpu" if dev is None else dev.type
            warnings.warn(
                f"the RNG state was saved on a {saved['type']} device and this process runs "
                f"on {here}; the device generator was not restored (the run stays valid but "
                "its random numbers differ from an uninterrupted run)",
                CheckpointWarning,
                stacklevel=2,
            )
        else:
            module = torch.get_device_module(dev.type)
            module.set_rng_state(torch.as_tensor(saved["state"], dtype=torch.uint8).cpu(), dev)
