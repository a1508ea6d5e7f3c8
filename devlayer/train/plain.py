"""``to_plain``: a copy of a training state that ``torch.load(weights_only=True)`` accepts.

Checkpoints are loaded with ``weights_only=True`` only (no arbitrary unpickling), so what
goes in must be made of tensors, numbers, strings and plain containers.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
from collections.abc import Mapping
from pathlib import PurePath
from types import ModuleType
from typing import Any

import torch

from devlayer.errors import InvalidArgumentError

__all__ = ["to_plain"]


def _numpy() -> ModuleType | None:
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def to_plain(obj: Any) -> Any:
    """A copy of ``obj`` made only of what ``torch.load(weights_only=True)`` accepts.

    Tensors, ``torch.Size`` / dtype / device, ``None``, bools, ints, floats, complex, str and
    bytes are kept; dicts (``OrderedDict`` kept, with a state_dict's ``_metadata``), lists,
    tuples and sets are converted element by element. Converted: enums to their value, NumPy
    scalars to Python numbers and arrays to tensors (object arrays to lists), namedtuples to
    tuples, dataclass instances to dicts, paths to strings. ``state_dict()`` results of
    modules, optimizers, LR schedulers and ``GradScaler`` are already plain.

    Args:
        obj: The value to convert.

    Returns:
        The converted value (tensors are not copied).

    Raises:
        InvalidArgumentError: A value of another type; the message names where it is.

    Example:
        >>> import enum
        >>> class Phase(enum.Enum):
        ...     TRAIN = "train"
        >>> to_plain({"phase": Phase.TRAIN, "sizes": (1, 2)})
        {'phase': 'train', 'sizes': (1, 2)}
    """
    return _plain(obj, "obj")


_ATOMS = (type(None), bool, int, float, complex, str, bytes)


def _plain(obj: Any, where: str) -> Any:
    if type(obj) in _ATOMS or isinstance(
        obj, (torch.Tensor, torch.Size, torch.dtype, torch.device)
    ):
        return obj
    if isinstance(obj, enum.Enum):
        return _plain(obj.value, where)
    np = _numpy()
    if np is not None:
        if isinstance(obj, np.generic):
            return _plain(obj.item(), where)
        if isinstance(obj, np.ndarray):
            if obj.dtype == object:
                return _plain(obj.tolist(), where)
            return torch.from_numpy(np.array(obj, copy=True))
    # Subclasses of int / float / str (other than enums) pickle as their own class.
    if isinstance(obj, int):  # bool is covered: no class can subclass it
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, complex):
        return complex(obj)
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, bytes):
        return bytes(obj)
    if isinstance(obj, Mapping):
        out: dict[Any, Any] = (
            collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
        )
        for key, value in obj.items():
            out[_plain(key, f"{where} key")] = _plain(value, f"{where}[{key!r}]")
        metadata = getattr(obj, "_metadata", None)  # state_dict version info
        if isinstance(out, collections.OrderedDict) and isinstance(metadata, Mapping):
            out._metadata = _plain(metadata, f"{where}._metadata")  # type: ignore[attr-defined]
        return out
    if isinstance(obj, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, (set, frozenset)):
        return {_plain(v, f"{where} item") for v in obj}
    if isinstance(obj, PurePath):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: _plain(getattr(obj, f.name), f"{where}.{f.name}")
            for f in dataclasses.fields(obj)
        }
    raise InvalidArgumentError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which "
        "torch.load(weights_only=True) refuses; store its state_dict() or convert it to "
        "tensors, numbers, strings, lists and dicts"
    )
