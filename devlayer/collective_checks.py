"""Whether ranks called the same collective the same way: the signature of a call.

:mod:`devlayer.comm` builds a signature per checked call (operation, reduce op, shapes or
dtype groups, ``src``, one ``"path shape dtype"`` per leaf, the caller's ``file:line`` and
the call's sequence number), checks with one small collective that every rank's is the
same and, when not, exchanges them and raises the error :func:`mismatch_error` words.
Which calls are checked is :func:`is_checked`: all of them with ``DEVLAYER_DEBUG=1``,
otherwise the first :data:`CHECK_FIRST` collectives of a State and then every
:data:`CHECK_EVERY`-th. Nothing here calls torch.distributed.

Example:
    >>> err = mismatch_error([["all_reduce", "sum", "[2] float32", None, [], "a.py:3", 7],
    ...                       ["all_reduce", "sum", "[3] float32", None, [], "a.py:3", 7]], rank=0)
    >>> "rank 0 all_reduce [2] float32 vs rank 1 all_reduce [3] float32" in str(err)
    True
    >>> [n for n in range(300) if is_checked(n, debug=False)][-4:]
    [62, 63, 128, 256]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from devlayer.errors import CollectiveError
from devlayer.tree import Leaf, pairing_order

__all__ = [
    "CHECK_EVERY",
    "CHECK_FIRST",
    "Signature",
    "is_checked",
    "broadcast_text",
    "dtype_name",
    "gather_text",
    "groups_text",
    "layout",
    "mismatch_error",
    "signature_text",
    "tensor_text",
]

#: [operation, reduce op, shapes or dtype groups, src, one "path shape dtype" per leaf,
#: the caller's "file:line", the call's sequence number]
Signature = list[Any]

#: Without DEVLAYER_DEBUG, every collective among the first CHECK_FIRST of a State is
#: checked, then every CHECK_EVERY-th: a mismatch in a training loop repeats, so it is met
#: by a checked call soon, and a check costs about one more small collective, so checking
#: 1 call in 128 keeps its share of a 4-byte all_reduce to about 2 % (docs/performance.md).
CHECK_FIRST = 64
CHECK_EVERY = 128


def is_checked(seq: int, *, debug: bool) -> bool:
    """Whether collective number ``seq`` (0-based, per State) has its signature checked.

    A pure function of numbers every rank has alike, so all ranks check the same calls
    (a check is itself a collective: ranks that disagreed on it would pair it with data).

    Args:
        seq: How many collectives this State ran before this one.
        debug: ``DEVLAYER_DEBUG=1``: check every call.
    """
    return debug or seq < CHECK_FIRST or seq % CHECK_EVERY == 0


def dtype_name(dtype: Any) -> str:
    """``float32`` for ``torch.float32``."""
    return str(dtype).replace("torch.", "")


def tensor_text(t: Any) -> str:
    """``[2, 3] float32``: a tensor's shape and dtype."""
    return f"{list(t.shape)} {dtype_name(t.dtype)}"


def gather_text(t: Any, same_shape: bool) -> str:
    """A tensor as an all_gather sees it: dim 0 is ``*`` unless ``same_shape``."""
    if same_shape:
        return f"{tensor_text(t)} (same_shape)"
    # Only dim 0 may differ between ranks in an uneven all_gather.
    dims = ", ".join(["*", *map(str, t.shape[1:])]) if t.dim() else ""
    return f"[{dims}] {dtype_name(t.dtype)}"


def groups_text(groups: Mapping[Any, tuple[list[int], list[int]]], leaves: list[Leaf]) -> str:
    """The (dtype, numel) groups an all_reduce of a container sends, in order."""
    return " + ".join(
        f"{dtype_name(dtype)}[{sum(leaves[i].numel() for i in tensors) + len(numbers)}]"
        for dtype, (tensors, numbers) in groups.items()
    )


def broadcast_text(leaves: list[Leaf], torch: Any) -> str:
    """``2 number(s) + float32[10]``: what a broadcast of a container sends."""
    numbers = sum(1 for v in leaves if not isinstance(v, torch.Tensor))
    sizes: dict[Any, int] = {}
    for v in leaves:
        if isinstance(v, torch.Tensor):
            sizes[v.dtype] = sizes.get(v.dtype, 0) + v.numel()
    parts = [f"{numbers} number(s)"] if numbers else []
    parts += [f"{dtype_name(d)}[{n}]" for d, n in sizes.items()]
    return " + ".join(parts) or "nothing"


def layout(obj: object, torch: Any, path: str = "") -> list[str]:
    """One ``"<path> <shape> <dtype>"`` entry per leaf, in the order they are sent."""
    if isinstance(obj, torch.Tensor):
        return [f"{path or 'value'} {tensor_text(obj)}"]
    if isinstance(obj, (int, float)):
        return [f"{path or 'value'} number"]
    items: Any = ()
    if isinstance(obj, Mapping):  # in the order the leaves are sent
        items = ((f"{path}[{k!r}]", obj[k]) for k in pairing_order(obj))
    elif isinstance(obj, (list, tuple)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(obj))
    return [entry for sub, value in items for entry in layout(value, torch, sub)]


def signature_text(sig: Any, other: Any) -> str:
    """``sig`` for an error message; op, src, leaves, call site and sequence number only
    where they differ from ``other``."""
    kind, op, payload, src, layout, site, seq = sig
    text = f"{kind}({op})" if op and op != other[1] else kind
    if payload:
        text += f" {payload}"
    if src is not None and src != other[3]:
        text += f" src={src}"
    # leaves too when the payload cannot say it: same payload, or a leaf more or fewer
    more_leaves = bool(layout) and bool(other[4]) and len(layout) != len(other[4])
    if layout != other[4] and (payload == other[2] or more_leaves):
        theirs = other[4]
        i = next(
            i
            for i in range(max(len(layout), len(theirs)))
            if i >= len(layout) or i >= len(theirs) or layout[i] != theirs[i]
        )
        text += f", leaf {i}: {layout[i]}" if i < len(layout) else f", no leaf {i}"
    if site != other[5]:
        text += f" called at {site}"
    if seq != other[6]:
        text += f" (its collective #{seq})"
    return text


def mismatch_error(sigs: list[Signature], *, rank: int) -> CollectiveError | None:
    """The error every rank raises when the ranks' signatures ``sigs`` differ, else None.

    Args:
        sigs: One signature per rank, in rank order (the same list on every rank).
        rank: This rank, named in the message.
    """
    odd = [r for r, sig in enumerate(sigs) if sig != sigs[0]]
    if not odd:
        return None
    first, other = sigs[0], sigs[odd[0]]
    more = f" (ranks {', '.join(map(str, odd))} all differ from rank 0)" if len(odd) > 1 else ""
    if first[:5] + first[6:] == other[:5] + other[6:]:
        # Only the lines differ: a call one rank skipped, or one collective written in two
        # branches. The two look alike, and a skip pairs every later call wrongly.
        more += (
            ". Only the calling lines differ: if this is one collective written in two "
            "branches (if rank == 0: ... else: ...), call it from one line "
            "(x = all_reduce(a if rank == 0 else b)); if a rank skipped a call, that rank "
            "must make it too"
        )
    return CollectiveError(
        f"collective mismatch at collective #{first[6]}: rank 0 "
        f"{signature_text(first, other)} vs rank {odd[0]} {signature_text(other, first)}{more}. "
        f"Every rank must call the same collectives in the same order, from the same line, "
        f"with the same op, shapes, dtypes, keys and src; the collective was not run (raised "
        f"on rank {rank} of {len(sigs)})"
    )
