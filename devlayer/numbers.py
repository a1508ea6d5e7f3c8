"""Python numbers in ``all_reduce``: one rule for ints, floats and bools on every rank.

A rank may pass an ``int`` where another passes a ``float`` (a metric that is ``0`` on a
rank that saw no batch), so a number's type cannot choose the buffer it travels in: each
rank would pick another one and the bits of an int would be added to those of a float.
Every number therefore travels the same way on every rank, in ONE float collective
(:func:`pack`): its float, a flag that says whether this rank gave a float, and one flag
per call that says whether this rank gave an int too large for the float to reduce
exactly (``|x| >= 2**53 / world`` for ``sum``, ``2**53`` otherwise; ``2**24`` where
floats are float32). The flags reduce under the call's op to "some rank set it".

The result type is the same on every rank: **a float if any rank gave a float** (or for
``op="mean"``, which sends the floats only), **else an int**; a bool counts as the int it
is (``True`` is 1). An int result is read from the float when no rank flagged a large int
and the result is below ``2**53`` (:func:`unpack`); every rank sees the same reduced
slots, so either all ranks take it or all run the exact path as a second collective:
the int64 image of every number (:func:`encode`), decoded with the float
(:func:`decode`). Ints stay exact, even past int64: int64 arithmetic wraps modulo
``2**64`` and the float of the same reduction says how often it wrapped, so
``2**62 + 2**62`` gives ``2**63``, as Python would. Where the float cannot tell (an int
beyond the float range, a ``max`` or ``min`` over an int outside int64, a sum or product
past about ``2**100``) every rank raises the same :class:`InvalidArgumentError` naming
the overflow.

Example:
    >>> r0 = pack([1, 2], "sum", eps=2.0**-52, world=2)  # rank 0: two ints
    >>> r1 = pack([1.5, 3], "sum", eps=2.0**-52, world=2)  # rank 1: a float, an int
    >>> r0, r1  # the numbers, their "gave a float" flags, the "large int" flag
    ([1.0, 2.0, 0.0, 0.0, 0.0], [1.5, 3.0, 1.0, 0.0, 0.0])
    >>> unpack([a + b for a, b in zip(r0, r1)], "sum", 2, eps=2.0**-52, world=2)
    [2.5, 5]
    >>> big = pack([2**62], "sum", eps=2.0**-52, world=2)
    >>> print(unpack([2 * v for v in big], "sum", 1, eps=2.0**-52, world=2))  # exact path
    None
    >>> e0, e1 = encode([1], "sum"), encode([1.5], "sum")  # the exact path's int64 slots
    >>> [a + b for a, b in zip(e0[0], e1[0])], [e0[1][0] + e1[1][0]]  # what SUM gives
    ([1, 1], [2.5])
    >>> decode([1], "sum", [1, 1], [2.5], eps=2.0**-52, world=2)
    [2.5]
    >>> decode([2**62], "sum", [-2**63, 0], [2.0**63], eps=2.0**-52, world=2) == [2**63]
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from devlayer.errors import InvalidArgumentError

__all__ = ["INT_SLOTS", "decode", "encode", "pack", "unpack", "wrap_int64"]

#: int64 slots per number on the exact path: the value modulo 2**64, the "gave a float" flag.
INT_SLOTS = 2
_WRAP = 2**64
_OR_BY_NONZERO = ("sum", "max")  # ops under which a 0/1 flag reduces to "any rank set it"


def wrap_int64(value: int) -> int:
    """``value`` modulo ``2**64`` as a signed int64 (int64 arithmetic is modular)."""
    return (value + 2**63) % _WRAP - 2**63


def _flag(op: str, on: bool) -> int:
    """A flag whose reduction under ``op`` tells whether any rank set it: 1 for set under
    ``sum``/``max`` (reduced: nonzero), 0 for set under ``min``/``product`` (reduced: 0)."""
    return int(on) if op in _OR_BY_NONZERO else int(not on)


def _any_set(op: str, reduced: float) -> bool:
    """Whether a reduced :func:`_flag` says that some rank set it."""
    return (reduced != 0) == (op in _OR_BY_NONZERO)


def _exact_limit(eps: float) -> int:
    """The first int the float cannot hold exactly beside its neighbours: ``2**53``
    for float64 (``eps`` ``2**-52``), ``2**24`` for float32."""
    return round(2 / eps)


def _int_limit(op: str, eps: float, world: int) -> int:
    """Ints below this magnitude on every rank reduce exactly in the float: for ``sum``
    every partial sum of ``world`` of them stays below :func:`_exact_limit`; ``max`` and
    ``min`` give one of them; a ``product`` is checked on its result."""
    limit = _exact_limit(eps)
    return limit // world if op == "sum" else limit


def _to_float(value: float) -> float:
    try:
        return float(value)
    except OverflowError:  # an int beyond the float range
        return math.inf if value > 0 else -math.inf


def pack(values: Sequence[float], op: str, *, eps: float, world: int) -> list[float]:
    """The float slots this rank sends for its numbers, all in one collective.

    Each number's float, then (except for ``mean``, which needs no flags) each number's
    "gave a float" flag and one flag "gave an int too large for the float to reduce
    exactly", all reduced under ``op``.

    Args:
        values: This rank's numbers, in the order they are sent.
        op: The reduce op name (``"sum"``, ``"mean"``, ``"max"``, ``"min"``, ``"product"``).
        eps: The float's machine epsilon (``torch.finfo(dtype).eps``).
        world: The number of ranks.
    """
    floats = [_to_float(v) for v in values]
    if op == "mean":
        return floats
    limit = _int_limit(op, eps, world)
    is_float = [isinstance(v, float) for v in values]
    large = any(not f and abs(int(v)) >= limit for v, f in zip(values, is_float, strict=True))
    return floats + [float(_flag(op, f)) for f in is_float] + [float(_flag(op, large))]


def unpack(
    reduced: Sequence[float], op: str, n: int, *, eps: float, world: int
) -> list[float] | None:
    """The ``n`` reduced numbers from the reduced :func:`pack` slots, or None when an int
    result may be inexact in the float: then every rank (they all see the same slots)
    runs the exact path (:func:`encode`, :func:`decode`).

    Args:
        reduced: The reduced slots, as :func:`pack` laid them out.
        op: The reduce op name.
        n: How many numbers were sent.
        eps: The float's machine epsilon.
        world: The number of ranks (``pack``'s, so every rank packs alike).
    """
    floats = list(reduced[:n])
    if op == "mean":
        return floats
    if _any_set(op, reduced[2 * n]):  # some rank gave a large int
        return None
    limit = _exact_limit(eps)
    out: list[float] = []
    for f, flag in zip(floats, reduced[n : 2 * n], strict=True):
        if _any_set(op, flag):  # some rank gave a float
            out.append(f)
        elif abs(f) < limit:  # False for NaN: a product of 0 and an overflow
            out.append(int(f))
        else:  # a sum or product that grew past what the float holds exactly
            return None
    return out


def encode(values: Sequence[float], op: str) -> tuple[list[int], list[float]]:
    """The exact path's int64 slots (:data:`INT_SLOTS` per number) and float slots.

    The flag is 1 for a float under ``sum``/``max`` and 0 for a float under
    ``min``/``product`` (1 for an int), so the reduced flag says whether any rank gave
    a float whatever the op.

    Args:
        values: This rank's numbers, in the order they are sent.
        op: The reduce op name (``"sum"``, ``"max"``, ``"min"``, ``"product"``; ``"mean"``
            sends the floats only).
    """
    floats = [_to_float(v) for v in values]
    if op == "mean":  # the result is a float whatever the ranks gave: no int slots
        return [], floats
    ints: list[int] = []
    for v in values:
        is_float = isinstance(v, float)
        ints.append(0 if is_float else wrap_int64(int(v)))
        ints.append(_flag(op, is_float))
    return ints, floats


def decode(
    mine: Sequence[float],
    op: str,
    ints: Sequence[int],
    floats: Sequence[float],
    *,
    eps: float,
    world: int,
    label: Callable[[int], str] | None = None,
) -> list[float]:
    """The reduced numbers, from the reduced int64 and float slots (same on every rank).

    Args:
        mine: This rank's numbers (only named in an error).
        op: The reduce op name.
        ints: The reduced int64 slots.
        floats: The reduced float slots.
        eps: The float's machine epsilon (``torch.finfo(dtype).eps``).
        world: The number of ranks (bounds the float's rounding error).
        label: Where the i-th number sits (``"['loss']"``), asked only for an error.

    Raises:
        InvalidArgumentError: An int result the int64 and float slots cannot give exactly.
    """
    out: list[float] = []
    for i, (value, f) in enumerate(zip(mine, floats, strict=True)):
        wrapped, flag = ints[INT_SLOTS * i], ints[INT_SLOTS * i + 1]
        if _any_set(op, flag):  # some rank gave a float
            out.append(f)
            continue
        exact = _exact_int(op, wrapped, f, eps, world)
        if exact is None:
            where = label(i) if label else f"number {i}"
            raise _overflow(where, value, op, f)
        out.append(exact)
    return out


def _exact_int(op: str, wrapped: int, f: float, eps: float, world: int) -> int | None:
    """The exact int whose int64 image is ``wrapped`` and whose float is ``f``, or None."""
    if not math.isfinite(f):
        return None
    slack = abs(f) * world * 4 * eps + 1  # bound on the float's rounding error
    if op in ("max", "min"):  # exact iff every rank's int fitted in int64
        return wrapped if abs(f - wrapped) <= slack else None
    if slack >= 2**62:  # the float no longer tells how often int64 wrapped
        return None
    exact = wrapped + round((f - wrapped) / _WRAP) * _WRAP
    return exact if abs(f - exact) <= slack else None


def _overflow(where: str, value: float, op: str, approx: float) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"all_reduce(op={op!r}) of Python ints at {where}: the result (about {approx:.6g}) "
        f"cannot be computed exactly (ints travel as int64 with a float to undo wrap-around; "
        f"this rank passed {value!r}); pass floats (float(x)) for an approximate result, or "
        f"smaller ints"
    )
