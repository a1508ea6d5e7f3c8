"""Nested containers of tensors and numbers: flatten them, rebuild them, pair dict keys.

The collectives (:mod:`devlayer.comm`) send a dict/list/tuple of tensors and Python numbers
as a few flat buffers. These helpers walk such a structure once, in an order every rank
agrees on (dict values are paired by key, whatever order each rank built its dict in), and
put the results back where they came from. Nothing here imports torch: the caller passes
the ``torch`` module.

Example:
    >>> import torch
    >>> leaves = []
    >>> skeleton = flatten({"b": 2.0, "a": [1, torch.ones(2)]}, leaves, torch)
    >>> leaves[:2]
    [1, tensor([1., 1.])]
    >>> unflatten(skeleton, iter(["A", "T", "B"]))
    {'b': 'B', 'a': ['A', 'T']}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from devlayer.errors import InvalidArgumentError

__all__ = [
    "LEAF",
    "MAX_DEPTH",
    "Leaf",
    "MapSkel",
    "checked_flatten",
    "copy_back",
    "flatten",
    "pairing_order",
    "path_to",
    "unflatten",
]

Leaf = Any  # a tensor or a Python number

#: How deeply containers may nest in a collective's argument (a dict in a list is depth 2).
#: Deeper, or a container that holds itself, raises InvalidArgumentError naming where.
MAX_DEPTH = 100


class _TooDeep(InvalidArgumentError):
    """Raised inside :func:`flatten`; :func:`checked_flatten` says why (a cycle or depth)."""


class LeafMark:
    """Where a leaf sat in the caller's structure (one shared marker; order gives identity)."""


LEAF = LeafMark()


@dataclass(frozen=True)
class MapSkel:
    """A mapping in the skeleton: its type, the caller's key order, and its children in the
    order their leaves were sent (:func:`pairing_order`)."""

    kind: type
    keys: list[Any]
    sent: list[Any]
    children: list[object]


def pairing_order(d: Mapping[Any, Any]) -> list[Any]:
    """The order in which a mapping's values are sent: the same on every rank, whatever
    order each rank built its dict in (metric dicts are often built in data-dependent order).

    String keys (the usual case) sort as strings. Any other mix of keys sorts by
    ``(type name, repr(key))``, which is total and identical on every rank as long as the
    keys' ``repr`` is (it is for numbers, strings, tuples of them, enums...; it is not for
    objects whose repr shows their address: ``DEVLAYER_DEBUG=1`` catches those).
    """
    keys = tuple(d)
    order = _ORDERS.get(keys)
    if order is None:  # sorting is cached: a metrics dict has the same keys every step
        order = sorted(keys) if all(type(k) is str for k in keys) else sorted(keys, key=_key_rank)
        if len(_ORDERS) >= _ORDERS_MAX:
            _ORDERS.clear()
        _ORDERS[keys] = order
    return order


_ORDERS: dict[tuple[Any, ...], list[Any]] = {}  # the caller's key order -> pairing order
_ORDERS_MAX = 512


def _key_rank(key: object) -> tuple[str, str, str]:
    return type(key).__module__, type(key).__qualname__, repr(key)


def flatten(obj: object, leaves: list[Leaf], torch: Any, depth: int = 0) -> object:
    """Append the leaves of ``obj`` to ``leaves`` in order; return the structure with markers.

    No per-leaf bookkeeping on this hot path: paths for error messages are found later by
    :func:`path_to`, only when there is an error to report.
    """
    if isinstance(obj, (torch.Tensor, int, float)):  # bool is an int
        leaves.append(obj)
        return LEAF
    if depth >= MAX_DEPTH and isinstance(obj, (Mapping, list, tuple)):
        raise _TooDeep("nested too deeply")
    if isinstance(obj, Mapping):
        sent = pairing_order(obj)
        children = [flatten(obj[k], leaves, torch, depth + 1) for k in sent]
        return MapSkel(type(obj), list(obj), sent, children)
    if isinstance(obj, (list, tuple)):
        items = [flatten(v, leaves, torch, depth + 1) for v in obj]
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
            return type(obj)(*items)  # type: ignore[arg-type]
        return type(obj)(items)
    raise InvalidArgumentError(
        f"a value of type {type(obj).__name__} was passed; collectives take tensors, Python "
        f"numbers and dict/list/tuple of them (use all_gather_object / broadcast_object for "
        f"other objects)"
    )


def checked_flatten(root: object, leaves: list[Leaf], torch: Any) -> object:
    """:func:`flatten`, with an error that names the path of a bad leaf, a cycle or depth."""
    try:
        return flatten(root, leaves, torch)
    except _TooDeep:
        raise InvalidArgumentError(depth_problem(root)) from None
    except InvalidArgumentError:
        bad = path_to(
            root, lambda v: not isinstance(v, (torch.Tensor, int, float, Mapping, list, tuple))
        )
        raise InvalidArgumentError(
            f"{bad[0] or 'value'} has type {type(bad[1]).__name__}; collectives take tensors, "
            f"Python numbers and dict/list/tuple of them (use all_gather_object / "
            f"broadcast_object for other objects)"
        ) from None


def _children(obj: object, path: str) -> list[tuple[str, object]]:
    if isinstance(obj, Mapping):
        return [(f"{path}[{k!r}]", v) for k, v in obj.items()]
    if isinstance(obj, (list, tuple)):
        return [(f"{path}[{i}]", v) for i, v in enumerate(obj)]
    return []


def depth_problem(root: object) -> str:
    """Why ``root`` nests deeper than :data:`MAX_DEPTH`: the container that holds one of its
    own ancestors (a cycle), else the path that goes too deep. No recursion."""
    stack: list[tuple[object, str, dict[int, str]]] = [(root, "", {})]
    while stack:
        obj, path, ancestors = stack.pop()
        if id(obj) in ancestors:
            return (
                f"{path} is {ancestors[id(obj)] or 'the argument itself'}: a cycle (a container "
                f"that holds itself); collectives take trees of tensors and numbers, so pass a "
                f"copy without the back reference"
            )
        if len(ancestors) >= MAX_DEPTH:
            return (
                f"{path[:80]}... nests containers more than {MAX_DEPTH} deep, the limit for a "
                f"collective's argument; flatten it (e.g. a dict of paths) or use "
                f"all_gather_object / broadcast_object"
            )
        inner = {**ancestors, id(obj): path}
        stack += [(v, p, inner) for p, v in reversed(_children(obj, path))]
    return f"the argument nests containers more than {MAX_DEPTH} deep"


def path_to(obj: object, match: Any, path: str = "", depth: int = 0) -> tuple[str, object]:
    """The first ``(path, value)`` in ``obj`` for which ``match(value)`` holds (slow path)."""
    if match(obj):
        return path, obj
    if depth > MAX_DEPTH:  # a cycle: flatten names it
        return "", None
    for sub_path, value in _children(obj, path):
        found = path_to(value, match, sub_path, depth + 1)
        if found[0] or found[1] is not None:
            return found
    return "", None


def unflatten(skeleton: object, values: Any) -> Any:
    """Rebuild the structure, taking leaves from the iterator ``values`` in order."""
    if skeleton is LEAF:
        return next(values)
    if isinstance(skeleton, MapSkel):
        got = {
            k: unflatten(v, values) for k, v in zip(skeleton.sent, skeleton.children, strict=True)
        }
        return skeleton.kind({k: got[k] for k in skeleton.keys})  # the caller's key order
    if isinstance(skeleton, tuple) and hasattr(skeleton, "_fields"):
        return type(skeleton)(*(unflatten(v, values) for v in skeleton))
    if isinstance(skeleton, (list, tuple)):
        return type(skeleton)(unflatten(v, values) for v in skeleton)
    return skeleton


def copy_back(targets: list[Any], sources: Sequence[Any], torch: Any) -> None:
    """``t.copy_(s)`` for every pair, in one fused call where torch has it."""
    foreach = getattr(torch, "_foreach_copy_", None)
    if foreach is not None and len(targets) > 1:
        foreach(targets, list(sources))
    else:
        for t, src in zip(targets, sources, strict=True):
            t.copy_(src)
