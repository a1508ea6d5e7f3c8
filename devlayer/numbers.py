"""Python numbers in ``all_reduce``: one rule for ints, floats and bools on every rank.

A rank may pass an ``int`` where another passes a ``float`` (a metric that is ``0`` on a
rank that saw no batch), so a number's type cannot choose the buffer it travels in: each
rank would pick another one and the bits of an int would be added to those of a float.
Every number therefore travels twice, the same way on every rank: as an int64 (exact for
ints), followed by a flag that says whether this rank gave a float, and as a float.

The result type is the same on every rank: **a float if any rank gave a float** (or for
``op="mean"``, which sends the float only), **else an int**; a bool counts as the int it
is (``True`` is 1). Ints stay exact, even past int64: int64 arithmetic wraps modulo
``2**64`` and the float of the same reduction says how often it wrapped, so
``2**62 + 2**62`` gives ``2**63``, as Python would. Where the float cannot tell (an int
beyond the float range, a ``max`` or ``min`` over an int outside int64, a sum or product
past about ``2**100``) every rank raises the same :class:`InvalidArgumentError` naming
the overflow.

Example:
    >>> r0, r1 = encode([1], "sum"), encode([1.5], "sum")  # rank 0 and rank 1
    >>> [a + b for a, b in zip(r0[0], r1[0])], [r0[1][0] + r1[1][0]]  # what SUM gives
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

__all__ = ["INT_SLOTS", "decode", "encode", "wrap_int64"]

#: int64 slots per number: the value modulo 2**64, and the "gave a float" flag.
INT_SLOTS = 2
_WRAP = 2**64
_OR_BY_NONZERO = ("sum", "max")  # ops under which a 0/1 flag reduces to "any rank set it"


def wrap_int64(value: int) -> int:
    """``value`` modulo ``2**64`` as a signed int64 (int64 arithmetic is modular)."""
    return (value + 2**63) % _WRAP - 2**63


def _to_float(value: float) -> float:
    try:
        return float(value)
    except OverflowError:  # an int beyond the float range
        return math.inf if value > 0 else -math.inf


def encode(values: Sequence[float], op: str) -> tuple[list[int], list[float]]:
    """The int64 slots (:data:`INT_SLOTS` per number) and float slots (one per number).

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
    flag_for_float = 1 if op in _OR_BY_NONZERO else 0
    for v in values:
        is_float = isinstance(v, float)
        ints.append(0 if is_float else wrap_int64(int(v)))
        ints.append(flag_for_float if is_float else 1 - flag_for_float)
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
        if (flag != 0) == (op in _OR_BY_NONZERO):  # some rank gave a float
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
