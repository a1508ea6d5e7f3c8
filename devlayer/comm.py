"""Collectives with one meaning on every backend.

* ``all_reduce(x, op)``: ops ``sum``, ``mean``, ``max``, ``min``, ``product`` on a tensor,
  a Python number, or nested dict/list/tuple of them. A container costs ONE collective per
  dtype, never one per key (numbers travel with the float tensors; an int result the float
  cannot hold exactly adds one, :mod:`devlayer.numbers`). ``mean`` is SUM then divide, so
  it works on gloo too.
* ``all_gather(x)``: a list with one entry per rank; tensors may differ in dim 0.
* ``broadcast(x, src=0)``: rank ``src``'s value everywhere.
* ``barrier(timeout=None)``: on gloo a monitored barrier that names the missing ranks.
* ``all_gather_object`` / ``broadcast_object``: any picklable object. They unpickle what
  peers send: use them only between ranks of your own job (see docs/security.md).

Tensors are updated in place and returned, as with ``torch.distributed``. A tensor on a
device the process group cannot use (e.g. a CPU-side device type the group lacks) is
copied to this rank's device, reduced there, and copied back into the caller's tensor.
Python numbers come back as Python numbers. Everything works at world size 1, where no
process group exists.

Every rank must pass the same structure, dtypes and (except for ``all_gather``) shapes.
Dict values are paired by key, so each rank may build its dicts in any key order; the
result keeps the caller's order (string keys are sent sorted, other key mixes sorted by
type and ``repr``). Python numbers may differ in type between ranks: the result is a
float if any rank gave a float, else the exact int (:mod:`devlayer.numbers`).

Ranks are checked to agree: a collective first compares a small signature (operation,
reduce op, shapes or dtype groups, keys, ``src``, the calling ``file:line`` and the
call's sequence number) with one all_reduce (MAX) of a two-int64 digest, and raises the
same :class:`CollectiveError` on every rank when they differ, e.g. ``rank 0 all_reduce
[2] float32 vs rank 1 all_reduce [3] float32``, instead of hanging, aborting (gloo aborts
on buffers of different sizes) or mixing up values. Only when the digests differ are the
signatures exchanged, as JSON text in a byte tensor, no pickle. That check costs about
one more small collective, so by default it runs on the first 64 collectives of a
``State`` and then on every 128th (:func:`devlayer.collective_checks.is_checked`); a
mismatch that starts later is caught at the next checked call if it repeats, as in a
training loop, and may abort or give wrong values until then. Since the calling line is
compared (it tells a call one rank skipped from the next one), every rank must make a
collective from the same line: ``x = all_reduce(a if rank == 0 else b)``, not one call
in each branch of an ``if``. With ``DEVLAYER_DEBUG=1``
(set it on every rank) every call is checked. ``barrier`` and ``vote_any`` are not
checked: a barrier must stay able to name a rank that never arrives, and a vote must not
block.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from devlayer.collective_checks import (
    Signature,
    broadcast_text,
    gather_text,
    groups_text,
    is_checked,
    layout,
    mismatch_error,
    tensor_text,
)
from devlayer.config import parse_timeout
from devlayer.errors import CollectiveError, DevlayerError, InvalidArgumentError
from devlayer.hangdump import on_collective_error
from devlayer.ledger import DONE, RUNNING, STATE, Ledger, first_outside, new_ledger
from devlayer.lifecycle import State, state
from devlayer.numbers import decode, encode, pack, unpack
from devlayer.torchcompat import float_dtype as _float_dtype
from devlayer.tree import (
    Leaf,
    checked_flatten,
    copy_back,
    pairing_order,
    path_to,
    unflatten,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "all_gather",
    "all_gather_object",
    "all_reduce",
    "barrier",
    "broadcast",
    "broadcast_object",
    "collective_ledger",
    "Vote",
    "vote_any",
]

T = TypeVar("T")

OPS = ("sum", "mean", "max", "min", "product")
_ALIASES = {"avg": "mean", "prod": "product", "add": "sum"}


class _Calls:
    """How many collectives a State has run: the sequence number of the next one."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


@dataclass(frozen=True)
class _Ctx:
    """Decisions made once per State, so the per-call path does no repeated work."""

    st: State
    world: int
    rank: int
    device: torch.device
    device_types: frozenset[str]
    reduce_ops: Mapping[str, Any]
    float_dtype: Any
    gather_into: Any
    dist: Any
    torch: Any
    debug: bool = False  # DEVLAYER_DEBUG=1: compare call signatures before every call
    calls: _Calls = field(default_factory=_Calls)  # decides which calls are checked
    ledger: Ledger = field(default_factory=Ledger)  # this State's collective records


_ctx_cache: _Ctx | None = None


def _ctx() -> _Ctx:
    global _ctx_cache
    st = state()
    cached = _ctx_cache
    if cached is not None and cached.st is st:
        return cached
    import torch
    import torch.distributed as dist

    ops = {
        "sum": dist.ReduceOp.SUM,
        "mean": dist.ReduceOp.SUM,
        "max": dist.ReduceOp.MAX,
        "min": dist.ReduceOp.MIN,
        "product": dist.ReduceOp.PRODUCT,
    }
    types = frozenset({"cpu", st.device.type})
    # torch 2.13 renamed all_gather_into_tensor to all_gather_single; 2.6 has only the old name.
    gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    # Python floats travel as float64, except on MPS, which has no float64.
    float_dtype = _float_dtype(st.device)
    # Read once per State: the per-call cost of debug mode being off is one attribute check.
    debug = st.settings.debug and st.world_size > 1
    _ctx_cache = _Ctx(
        st,
        st.world_size,
        st.rank,
        st.device,
        types,
        ops,
        float_dtype,
        gather_into,
        dist,
        torch,
        debug,
        ledger=new_ledger(),
    )
    return _ctx_cache


def _op_name(op: object) -> str:
    if isinstance(op, str):
        name = _ALIASES.get(op.lower(), op.lower())
        if name in OPS:
            return name
    raise InvalidArgumentError(
        f"op={op!r} is not a reduce operation; use one of {', '.join(repr(o) for o in OPS)}"
    )


def _fail(ctx: _Ctx, what: str, exc: BaseException) -> CollectiveError:
    """The error of a failed collective; with hang reports on, it says which rank is where
    (:func:`devlayer.hangdump.on_collective_error`: this rank's dump, the others' posted
    positions and dumps) instead of guessing."""
    head = (
        f"{what} failed on rank {ctx.rank} of {ctx.world} ({ctx.st.comm}): "
        f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}."
    )
    hang = _hang_report(ctx, what)
    if hang:
        return CollectiveError(f"{head} {hang}")
    return CollectiveError(
        f"{head} A peer rank probably exited or timed out (timeout "
        f"{ctx.st.timeout.total_seconds():g}s); check the other ranks' output"
    )


def _hang_report(ctx: _Ctx, what: str) -> str:
    """Mark the collective in flight failed; the hang report (empty when they are off)."""
    last = ctx.ledger.last()
    if last is not None and last[STATE] == RUNNING:
        Ledger.fail(last)
    try:
        return on_collective_error(what)
    except Exception as err:  # a report must never hide the collective's own error
        return f"(no hang report: {type(err).__name__}: {err})"


# --------------------------------------------------------------------------- all_reduce


def all_reduce(x: T, op: str = "sum") -> T:
    """Reduce ``x`` across all ranks and return the result.

    Args:
        x: A tensor, a Python number, or a nested dict/list/tuple of them.
        op: ``"sum"``, ``"mean"``, ``"max"``, ``"min"`` or ``"product"``.

    Returns:
        The same structure with reduced values. Tensors are reduced in place (and returned);
        numbers come back as numbers (``mean`` gives floats).

    Raises:
        InvalidArgumentError: Unknown op, unsupported leaf type, or ``mean`` of an integer
            tensor (it cannot be stored in place; cast to float first).
        CollectiveError: A peer failed or the collective timed out.
        NotInitializedError: Before ``devlayer.init()``.

    Example:
        >>> import devlayer
        >>> _ = devlayer.init(backend="cpu")
        >>> devlayer.all_reduce({"loss": 2.0, "correct": 3}, op="mean")
        {'loss': 2.0, 'correct': 3.0}
        >>> _ = devlayer.shutdown()
    """
    name = _op_name(op)
    ctx = _ctx()
    if isinstance(x, ctx.torch.Tensor):
        return _reduce_tensor(ctx, x, name)
    if ctx.world == 1:
        return _reduce_container(ctx, x, name)
    return _recorded(ctx, "all_reduce", _kind(x), _reduce_container, ctx, x, name)


def _reduce_container(ctx: _Ctx, x: T, name: str) -> T:
    """:func:`all_reduce` of a number or a container."""
    torch = ctx.torch
    seq = _next_seq(ctx)
    if type(x) is dict and x and ctx.world > 1 and seq is None:
        done = _reduce_uniform_dict(ctx, x, name)
        if done is not None:
            return done  # type: ignore[return-value]
    leaves: list[Leaf] = []
    obj: Any = x
    flat_dict = type(obj) is dict and all(isinstance(v, torch.Tensor) for v in obj.values())
    if flat_dict:
        # A flat dict of tensors: no structure to walk. Leaves go in pairing order; the
        # tensors are reduced in place, so the result is the caller's dict, copied.
        leaves.extend(obj[k] for k in pairing_order(obj))
        skeleton: object = None
    else:
        skeleton = checked_flatten(x, leaves, torch)
    if ctx.world == 1:
        alone = [_alone(x, leaf, name, torch) for leaf in leaves]
        return dict(obj) if flat_dict else unflatten(skeleton, iter(alone))  # type: ignore[return-value]
    groups = _dtype_groups(ctx, leaves, name, x)
    if seq is not None:
        _check_signatures(ctx, seq, "all_reduce", name, groups_text(groups, leaves), x)
    results = _reduce_groups(ctx, leaves, groups, name, x)
    if flat_dict:
        return dict(obj)  # type: ignore[return-value]
    return unflatten(skeleton, iter(results))


def _dtype_groups(
    ctx: _Ctx, leaves: list[Leaf], name: str, root: object
) -> dict[Any, tuple[list[int], list[int]]]:
    """``dtype -> (tensor leaf indices, number leaf indices)``: one collective per dtype.

    Python numbers join the float tensors' group (float64; float32 on MPS) whatever their
    type on this rank, with flags that say whether some rank gave a float or an int the
    float cannot reduce exactly (:mod:`devlayer.numbers`).
    """
    torch = ctx.torch
    groups: dict[Any, tuple[list[int], list[int]]] = {}
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            if name == "mean" and not (leaf.is_floating_point() or leaf.is_complex()):
                raise _int_mean(path_to(root, lambda v, t=leaf: v is t)[0], leaf)
            groups.setdefault(leaf.dtype, ([], []))[0].append(i)
        else:
            groups.setdefault(ctx.float_dtype, ([], []))[1].append(i)
    return groups


def _reduce_groups(
    ctx: _Ctx, leaves: list[Leaf], groups: dict[Any, Any], name: str, root: object
) -> list[object]:
    """Reduce every dtype group; the results in leaf order (tensors are the leaves)."""
    torch = ctx.torch
    numbers = [i for i, leaf in enumerate(leaves) if not isinstance(leaf, torch.Tensor)]
    mine = [leaves[i] for i in numbers]
    eps = torch.finfo(ctx.float_dtype).eps
    results: list[object] = [None] * len(leaves)
    reduced: list[Any] = []
    for dtype, (tensor_idx, number_idx) in groups.items():
        tail = pack(mine, name, eps=eps, world=ctx.world) if number_idx else []
        got = _reduce_group(ctx, leaves, results, dtype, tensor_idx, tail, name)
        if number_idx:
            reduced = got
    if numbers:
        values = unpack(reduced, name, len(mine), eps=eps, world=ctx.world)
        if values is None:  # every rank sees the same reduced slots: all of them come here
            values = _exact_numbers(ctx, mine, reduced[: len(mine)], name, (root, numbers))
        for i, value in zip(numbers, values, strict=True):
            results[i] = value
    return results


def _exact_numbers(
    ctx: _Ctx, mine: list[Leaf], floats: list[float], name: str, where: tuple[object, list[int]]
) -> list[float]:
    """The numbers' exact path, a second collective: their int64 images (which wrap) and
    flags, decoded with the floats already reduced (:func:`devlayer.numbers.decode`).

    ``where`` is the call's argument and the numbers' leaf indices, to name a number in
    an error.
    """
    torch = ctx.torch
    root, numbers = where
    ints, _ = encode(mine, name)
    reduced = _reduce_group(ctx, [], [], torch.int64, [], ints, name)
    return decode(
        mine,
        name,
        reduced,
        floats,
        eps=torch.finfo(ctx.float_dtype).eps,
        world=ctx.world,
        label=lambda k: layout(root, torch)[numbers[k]].rsplit(" ", 1)[0],
    )


def _reduce_group(
    ctx: _Ctx,
    leaves: list[Leaf],
    results: list[object],
    dtype: Any,
    tensor_idx: list[int],
    tail: list[Any],
    name: str,
) -> list[Any]:
    """Reduce one dtype group's tensors and ``tail`` values in one collective.

    The tensors are written back (and put in ``results``); the reduced ``tail`` is returned.
    """
    torch = ctx.torch
    tensors = [leaves[i] for i in tensor_idx]
    parts = []
    scalars = bool(tensors) and all(t.dim() == 0 for t in tensors)
    if tensors:
        try:  # the common metrics case: 0-d tensors on one device, stacked in one call
            packed = torch.stack(tensors) if scalars else None
        except RuntimeError:  # tensors on different devices
            packed = None
        if packed is None:
            packed = torch.cat([t.reshape(-1).to(ctx.device) for t in tensors])
        parts.append(packed if packed.device == ctx.device else packed.to(ctx.device))
    if tail:
        parts.append(torch.tensor(tail, dtype=dtype, device=ctx.device))
    flat = parts[0] if len(parts) == 1 else torch.cat(parts)
    _reduce_flat(ctx, flat, name)
    n_tensor = parts[0].numel() if tensors else 0
    if tensors:
        head = flat[:n_tensor]
        if scalars:
            sources: Sequence[Any] = head.unbind()
        else:
            chunks = head.split([t.numel() for t in tensors])
            sources = [c.view(t.shape) for c, t in zip(chunks, tensors, strict=True)]
        copy_back(tensors, sources, torch)
        for i in tensor_idx:
            results[i] = leaves[i]
    return flat[n_tensor:].tolist() if tail else []


def _reduce_uniform_dict(ctx: _Ctx, x: Any, name: str) -> dict[Any, Any] | None:
    """The metrics fast path: a flat dict of same-dtype, same-shape tensors on one device.

    One ``torch.stack``, one collective, one fused write-back, and no per-leaf Python beyond
    reading each dtype. Returns None when the dict is not that simple; the general path
    then handles it (and raises the errors with paths).
    """
    torch = ctx.torch
    tensors = [x[k] for k in pairing_order(x)]  # paired by key, not by position
    try:
        dtypes = {t.dtype for t in tensors}
    except AttributeError:  # numbers or nested containers: the general path
        return None
    if len(dtypes) != 1:
        return None
    (dtype,) = dtypes
    if name == "mean" and not (dtype.is_floating_point or dtype.is_complex):
        return None
    try:
        packed = torch.stack(tensors)  # fails for mixed shapes or devices, or non-tensors
    except (RuntimeError, TypeError):
        return None
    work = packed if packed.device == ctx.device else packed.to(ctx.device)
    _reduce_flat(ctx, work, name)
    copy_back(tensors, work.unbind(), torch)
    return dict(x)


def _alone(root: object, leaf: Any, name: str, torch: Any) -> Any:
    """What a reduction over one rank gives: the value itself (mean of numbers: a float)."""
    if isinstance(leaf, torch.Tensor):
        if name == "mean" and not (leaf.is_floating_point() or leaf.is_complex()):
            raise _int_mean(path_to(root, lambda v: v is leaf)[0], leaf)
        return leaf
    return float(leaf) if name == "mean" else leaf


def _int_mean(path: str, t: Any) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"all_reduce(op='mean') of {path or 'a tensor'} with dtype {t.dtype}: the mean of "
        f"integers is not an integer and cannot be stored in place; pass t.float() or use "
        f"op='sum' and divide"
    )


def _reduce_flat(ctx: _Ctx, buf: Any, name: str) -> None:
    if ctx.world > 1:
        try:
            ctx.dist.all_reduce(buf, op=ctx.reduce_ops[name])
        except RuntimeError as exc:
            raise _fail(ctx, "all_reduce", exc) from exc
        if name == "mean":
            buf.div_(ctx.world)


def _reduce_tensor(ctx: _Ctx, t: Any, name: str) -> Any:
    if name == "mean" and not (t.is_floating_point() or t.is_complex()):
        raise _int_mean("", t)
    if ctx.world == 1:
        return t
    # depth 3: begin <- _reduce_tensor <- all_reduce <- its caller (the only path here).
    rec = ctx.ledger.begin("all_reduce", (t.shape, t.dtype), 3)
    try:
        seq = _next_seq(ctx)
        if seq is not None:
            _check_signatures(ctx, seq, "all_reduce", name, tensor_text(t))
        if t.device.type in ctx.device_types and t.is_contiguous():
            work = t
        else:
            work = t.to(ctx.device).contiguous()
        try:
            ctx.dist.all_reduce(work, op=ctx.reduce_ops[name])
        except RuntimeError as exc:
            raise _fail(ctx, "all_reduce", exc) from exc
    except BaseException:
        Ledger.fail(rec)
        raise
    rec[STATE] = DONE  # Ledger.done, inlined: the hottest path
    if name == "mean":
        work.div_(ctx.world)
    if work is not t:
        t.copy_(work)
    return t


def _recorded(ctx: _Ctx, op: str, detail: object, fn: Any, *args: Any) -> Any:
    """``fn(*args)`` recorded in the ledger as collective ``op`` (world size > 1).

    Called only by the public collectives themselves: the ledger's search for the user's
    frame starts at their caller (depth 3: begin <- _recorded <- the collective <- caller).
    """
    rec = ctx.ledger.begin(op, detail, 3)
    try:
        out = fn(*args)
    except BaseException:
        Ledger.fail(rec)
        raise
    rec[STATE] = DONE  # Ledger.done, inlined
    return out


def _kind(x: object) -> object:
    """A ledger signature for ``x``: ``(shape, dtype)`` of a tensor, else type and size."""
    shape = getattr(x, "shape", None)
    if shape is not None and hasattr(x, "dtype"):
        return (shape, x.dtype)
    if isinstance(x, (dict, list, tuple)):
        return f"{type(x).__name__} of {len(x)}"
    return type(x).__name__


# --------------------------------------------------------------------------- all_gather

_HEADER = 10  # [ndim, dtype code, d0..d7]
_MAX_DIMS = _HEADER - 2


def all_gather(x: Any, *, same_shape: bool = False) -> list[Any]:
    """Gather ``x`` from every rank.

    Args:
        x: A tensor or a Python number.
        same_shape: Promise that every rank passes the same shape; skips the small shape
            exchange that lets dim 0 differ between ranks.

    Returns:
        A list with one entry per rank, in rank order. Tensors come back on the device of
        ``x``; numbers as numbers.

    Raises:
        InvalidArgumentError: Other types, or ranks that disagree on dtype or trailing dims
            (every rank raises the same error; nothing hangs).
        CollectiveError: A peer failed or the collective timed out.

    Example:
        >>> import devlayer, torch
        >>> _ = devlayer.init(backend="cpu")
        >>> devlayer.all_gather(torch.arange(3))
        [tensor([0, 1, 2])]
        >>> _ = devlayer.shutdown()
    """
    ctx = _ctx()
    if ctx.world == 1:
        return _all_gather(ctx, x, same_shape)
    return _recorded(ctx, "all_gather", _kind(x), _all_gather, ctx, x, same_shape)


def _all_gather(ctx: _Ctx, x: Any, same_shape: bool) -> list[Any]:
    torch = ctx.torch
    if isinstance(x, (bool, int, float)):
        seq = _next_seq(ctx)
        if seq is not None:
            _check_signatures(ctx, seq, "all_gather", payload="number")
        return _gather_numbers(ctx, x)
    if not isinstance(x, torch.Tensor):
        raise InvalidArgumentError(
            f"all_gather takes a tensor or a number, got {type(x).__name__}; use "
            f"all_gather_object for other objects"
        )
    if ctx.world == 1:
        return [x]
    seq = _next_seq(ctx)
    if seq is not None:
        _check_signatures(ctx, seq, "all_gather", payload=gather_text(x, same_shape))
    t = x if x.device.type in ctx.device_types else x.to(ctx.device)
    t = t.contiguous()
    parts = _gather_equal(ctx, t) if same_shape else _gather_uneven(ctx, t)
    if parts and parts[0].device != x.device:
        parts = [p.to(x.device) for p in parts]
    return parts


def _gather_equal(ctx: _Ctx, t: Any) -> list[Any]:
    torch = ctx.torch
    flat = t.reshape(-1) if t.dim() == 0 else t
    out = torch.empty((ctx.world * flat.shape[0], *flat.shape[1:]), dtype=t.dtype, device=t.device)
    try:
        ctx.gather_into(out, flat)
    except RuntimeError as exc:
        raise _fail(ctx, "all_gather", exc) from exc
    parts = list(out.chunk(ctx.world))
    return [p.reshape(t.shape) for p in parts] if t.dim() == 0 else parts


def _dtype_code(torch: Any, dtype: Any) -> int:
    return list(_dtype_table(torch)).index(dtype) if dtype in _dtype_table(torch) else -1


def _dtype_table(torch: Any) -> tuple[Any, ...]:
    return (
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
        torch.complex64,
        torch.complex128,
    )


def _gather_uneven(ctx: _Ctx, t: Any) -> list[Any]:
    torch = ctx.torch
    if t.dim() > _MAX_DIMS:
        raise InvalidArgumentError(
            f"all_gather of a {t.dim()}-d tensor: at most {_MAX_DIMS} dims are supported; "
            f"reshape first or pass same_shape=True"
        )
    shape = list(t.shape) if t.dim() else [1]
    header = [t.dim(), _dtype_code(torch, t.dtype), *shape, *([0] * (_MAX_DIMS - len(shape)))]
    hdr = torch.tensor(header, dtype=torch.int64, device=t.device)
    headers = _gather_equal(ctx, hdr.view(1, -1))
    rows = [h.view(-1).tolist() for h in headers]
    mine = rows[ctx.rank]
    for r, row in enumerate(rows):
        if row[0] != mine[0] or row[1] != mine[1] or row[3 : 2 + row[0]] != mine[3 : 2 + mine[0]]:
            raise InvalidArgumentError(
                f"all_gather: ranks disagree: rank {ctx.rank} has {_describe(torch, mine)}, "
                f"rank {r} has {_describe(torch, row)}; only dim 0 may differ"
            )
    sizes = [row[2] for row in rows]
    if t.dim() == 0 or len(set(sizes)) == 1:
        return _gather_equal(ctx, t)
    longest = max(sizes)
    padded = t
    if t.shape[0] < longest:
        pad = torch.zeros((longest - t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
        padded = torch.cat([t, pad])
    parts = _gather_equal(ctx, padded)
    return [p[:n] for p, n in zip(parts, sizes, strict=True)]


def _describe(torch: Any, row: list[int]) -> str:
    ndim, code = row[0], row[1]
    table = _dtype_table(torch)
    dtype = str(table[code]).replace("torch.", "") if 0 <= code < len(table) else "other dtype"
    return f"{dtype} {list(row[2 : 2 + max(ndim, 0)])}"


def _encode_number(torch: Any, value: object) -> list[int]:
    if isinstance(value, bool):
        return [2, int(value)]
    if isinstance(value, int):
        return [0, value] if -(2**63) <= value < 2**63 else [3, 0]  # 3: outside int64
    bits = torch.tensor([float(value)], dtype=torch.float64).view(torch.int64).item()  # type: ignore[arg-type]
    return [1, int(bits)]


def _decode_number(torch: Any, kind: int, bits: int, what: str = "", rank: int = 0) -> object:
    if kind == 2:
        return bool(bits)
    if kind == 0:
        return bits
    if kind == 3:  # raised on every rank alike, after the collective
        raise InvalidArgumentError(
            f"{what}: rank {rank} passed an int outside int64 (-2**63 .. 2**63 - 1), the range "
            f"{what} carries ints in; pass float(x), or use {what}_object for big ints"
        )
    return torch.tensor([bits], dtype=torch.int64).view(torch.float64).item()


def _gather_numbers(ctx: _Ctx, x: object) -> list[Any]:
    if ctx.world == 1:
        return [x]
    torch = ctx.torch
    buf = torch.tensor(_encode_number(torch, x), dtype=torch.int64, device=ctx.device)
    parts = _gather_equal(ctx, buf.view(1, 2))
    pairs = [p.view(-1).tolist() for p in parts]
    return [_decode_number(torch, k, bits, "all_gather", r) for r, (k, bits) in enumerate(pairs)]


# --------------------------------------------------------------------------- broadcast


def _check_src(ctx: _Ctx, src: object) -> int:
    if isinstance(src, bool) or not isinstance(src, int) or not 0 <= src < ctx.world:
        raise InvalidArgumentError(
            f"src={src!r} is not a rank of this job; use an int in 0..{ctx.world - 1}"
        )
    return src


def broadcast(x: T, src: int = 0) -> T:
    """Send rank ``src``'s ``x`` to every rank.

    Args:
        x: A tensor, a number, or a nested dict/list/tuple of them, with the same structure
            (and tensor shapes/dtypes) on every rank; non-src values are placeholders.
        src: The sending rank.

    Returns:
        ``x`` with ``src``'s values: tensors filled in place, numbers as numbers.

    Example:
        >>> import devlayer
        >>> _ = devlayer.init(backend="cpu")
        >>> devlayer.broadcast({"seed": 1234})
        {'seed': 1234}
        >>> _ = devlayer.shutdown()
    """
    ctx = _ctx()
    if ctx.world == 1:
        return _broadcast(ctx, x, src)
    return _recorded(ctx, "broadcast", _kind(x), _broadcast, ctx, x, src)


def _broadcast(ctx: _Ctx, x: T, src: int) -> T:
    torch = ctx.torch
    src = _check_src(ctx, src)
    if isinstance(x, torch.Tensor):
        if ctx.world > 1:
            seq = _next_seq(ctx)
            if seq is not None:
                _check_signatures(ctx, seq, "broadcast", payload=tensor_text(x), src=src)
            _broadcast_tensors(ctx, [x], src)
        return x
    if ctx.world == 1:
        checked_flatten(x, [], torch)  # the same type errors as with several ranks
        return x
    leaves: list[Leaf] = []
    skeleton = checked_flatten(x, leaves, torch)
    seq = _next_seq(ctx)
    if seq is not None:
        text = broadcast_text(leaves, torch)
        _check_signatures(ctx, seq, "broadcast", payload=text, src=src, root=x)
    results: list[object] = [None] * len(leaves)
    numbers = [i for i, v in enumerate(leaves) if not isinstance(v, torch.Tensor)]
    if numbers:
        codes = [c for i in numbers for c in _encode_number(torch, leaves[i])]
        buf = torch.tensor(codes, dtype=torch.int64, device=ctx.device)
        _broadcast_tensors(ctx, [buf], src)
        pairs = buf.view(-1, 2).tolist()
        for i, (kind, bits) in zip(numbers, pairs, strict=True):
            results[i] = _decode_number(torch, kind, bits, "broadcast", src)
    by_dtype: dict[Any, list[int]] = {}
    for i, v in enumerate(leaves):
        if isinstance(v, torch.Tensor):
            by_dtype.setdefault(v.dtype, []).append(i)
    for idxs in by_dtype.values():
        tensors = [leaves[i] for i in idxs]
        flat = torch.cat([t.reshape(-1).to(ctx.device) for t in tensors])
        _broadcast_tensors(ctx, [flat], src)
        chunks = flat.split([t.numel() for t in tensors])
        copy_back(tensors, [c.view(t.shape) for c, t in zip(chunks, tensors, strict=True)], torch)
        for i in idxs:
            results[i] = leaves[i]
    return unflatten(skeleton, iter(results))


def _broadcast_tensors(ctx: _Ctx, tensors: list[Any], src: int) -> None:
    for t in tensors:
        work = (
            t
            if t.device.type in ctx.device_types and t.is_contiguous()
            else t.to(ctx.device).contiguous()
        )
        try:
            ctx.dist.broadcast(work, src=src)
        except RuntimeError as exc:
            raise _fail(ctx, "broadcast", exc) from exc
        if work is not t:
            t.copy_(work)


# --------------------------------------------------------------------------- barrier


def barrier(timeout: float | timedelta | None = None) -> None:
    """Wait until every rank arrives.

    On gloo this is a *monitored* barrier: when a rank does not arrive within ``timeout``,
    the error names the missing rank(s) on every rank that is still there.

    Args:
        timeout: Seconds or a timedelta (default: the ``init()`` timeout).

    Raises:
        CollectiveError: A rank did not arrive in time, or a peer failed.
    """
    ctx = _ctx()
    if ctx.world == 1:
        return _barrier(ctx, timeout)
    return _recorded(ctx, "barrier", None, _barrier, ctx, timeout)


def _barrier(ctx: _Ctx, timeout: float | timedelta | None) -> None:
    tmo = parse_timeout(timeout) or ctx.st.timeout
    if ctx.world == 1:
        return
    dist = ctx.dist
    try:
        # monitored_barrier needs a plain gloo group; comm="gloo" on an accelerator makes a
        # "<device>:gloo,cpu:gloo" group, which takes the ordinary barrier.
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=tmo, wait_all_ranks=True)
        else:
            work = dist.barrier(async_op=True)
            if not work.wait(tmo):
                raise RuntimeError(f"barrier did not complete within {tmo.total_seconds():g}s")
    except (RuntimeError, ValueError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        head = f"barrier failed on rank {ctx.rank} of {ctx.world}"
        hang = _hang_report(ctx, "barrier")
        raise CollectiveError(
            f"{head} after at most {tmo.total_seconds():g}s: {text}{' ' + hang if hang else ''}"
        ) from exc


# --------------------------------------------------------------------------- checks
# Which calls are checked and the signature's text are in devlayer.collective_checks; the
# collectives that compare them are here.


def _next_seq(ctx: _Ctx) -> int | None:
    """Count a collective (world size > 1); its sequence number if it is to be checked."""
    if ctx.world == 1:
        return None
    calls = ctx.calls
    seq = calls.n
    calls.n = seq + 1
    return seq if is_checked(seq, debug=ctx.debug) else None


def _call_site() -> str:
    """``file.py:line`` of the code that called the collective (the first frame outside
    devlayer, as the ledger names it): the same on every rank that runs the same program."""
    start = sys._getframe(1)
    frame = first_outside(start) or start
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"


def _check_signatures(
    ctx: _Ctx,
    seq: int,
    kind: str,
    op: str = "",
    payload: str = "",
    root: object = None,
    *,
    src: int | None = None,
) -> None:
    """Compare this call's signature across ranks; raise the same CollectiveError on every
    rank if any rank's differs.

    ``root`` (a container) adds the path, shape and dtype of every leaf, so two dicts with
    the same dtype groups but different keys or leaf shapes are caught too: they would
    otherwise be reduced into each other's values without any error. The call site tells
    apart a call one rank skipped from the next one, however alike their arguments.
    """
    leaves = layout(root, ctx.torch) if root is not None else []
    mine: Signature = [kind, op, payload, src, leaves, _call_site(), seq]
    if _agree(ctx, kind, json.dumps(mine)):
        return
    sigs = _exchange(ctx, kind, mine)  # they differ somewhere: find out how, on every rank
    error = mismatch_error(sigs, rank=ctx.rank)
    if error is not None:
        raise error


def _agree(ctx: _Ctx, kind: str, text: str) -> bool:
    """Whether every rank's ``text`` has the same digest: ONE all_reduce of two int64.

    MAX of ``[h, -h]`` gives the largest and the smallest digest at once; they are equal on
    every rank or on none, so all ranks take the same branch (the slow exchange that names
    both sides runs only on a mismatch). The buffer has the same size on every rank
    whatever the call, so this collective itself can never be mismatched.
    """
    torch = ctx.torch
    digest = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "little")
    buf = torch.tensor([digest, -digest], dtype=torch.int64, device=ctx.device)
    try:
        ctx.dist.all_reduce(buf, op=ctx.reduce_ops["max"])
    except RuntimeError as exc:
        raise _fail(ctx, kind, exc) from exc  # as the call itself would fail
    high, neg_low = buf.tolist()
    return bool(high == -neg_low)


def _exchange(ctx: _Ctx, kind: str, mine: Signature) -> list[Signature]:
    """Every rank's signature, as JSON text in a uint8 tensor: no pickle, so debug mode does
    not make tensor collectives unpickle what peers send (docs/security.md)."""
    torch = ctx.torch
    data = torch.frombuffer(bytearray(json.dumps(mine).encode()), dtype=torch.uint8)
    try:
        parts = _gather_uneven(ctx, data)  # the same two gathers whatever the signature
    except DevlayerError as exc:
        raise CollectiveError(f"{kind}: signature exchange: {exc}") from exc
    return [json.loads(p.cpu().numpy().tobytes()) for p in parts]


# --------------------------------------------------------------------------- objects


def all_gather_object(obj: Any) -> list[Any]:
    """Gather any picklable object from every rank (pickle: trusts the peer ranks).

    Example:
        >>> import devlayer
        >>> _ = devlayer.init(backend="cpu")
        >>> devlayer.all_gather_object({"host": "a"})
        [{'host': 'a'}]
        >>> _ = devlayer.shutdown()
    """
    ctx = _ctx()
    if ctx.world == 1:
        return _all_gather_object(ctx, obj)
    return _recorded(ctx, "all_gather_object", type(obj).__name__, _all_gather_object, ctx, obj)


def _all_gather_object(ctx: _Ctx, obj: Any) -> list[Any]:
    if ctx.world == 1:
        return [obj]
    seq = _next_seq(ctx)
    if seq is not None:
        _check_signatures(ctx, seq, "all_gather_object")
    out: list[Any] = [None] * ctx.world
    try:
        ctx.dist.all_gather_object(out, obj)
    except RuntimeError as exc:
        raise _fail(ctx, "all_gather_object", exc) from exc
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send rank ``src``'s picklable object to every rank (pickle: trusts the peer ranks)."""
    ctx = _ctx()
    if ctx.world == 1:
        return _broadcast_object(ctx, obj, src)
    return _recorded(ctx, "broadcast_object", type(obj).__name__, _broadcast_object, ctx, obj, src)


def _broadcast_object(ctx: _Ctx, obj: Any, src: int) -> Any:
    src = _check_src(ctx, src)
    if ctx.world == 1:
        return obj
    seq = _next_seq(ctx)
    if seq is not None:
        _check_signatures(ctx, seq, "broadcast_object", src=src)
    box = [obj]
    try:
        ctx.dist.broadcast_object_list(box, src=src)
    except RuntimeError as exc:
        raise _fail(ctx, "broadcast_object", exc) from exc
    return box[0]


# --------------------------------------------------------------------------- vote_any


class Vote:
    """A vote started by :func:`vote_any`; :meth:`result` waits for it and gives the outcome."""

    def __init__(self, ctx: _Ctx, flag: Any, work: Any, rec: list[Any] | None = None) -> None:
        self._ctx, self._flag, self._work, self._rec = ctx, flag, work, rec

    def result(self) -> bool:
        """True on every rank when any rank voted True (waits if still in flight).

        Raises:
            CollectiveError: A peer rank failed or timed out.
        """
        if self._work is not None:
            work, self._work = self._work, None
            try:
                work.wait()
            except RuntimeError as exc:
                if self._rec is not None:
                    Ledger.fail(self._rec)
                raise _fail(self._ctx, "vote_any", exc) from exc
            if self._rec is not None:
                Ledger.done(self._rec)
        return bool(self._flag.item())


def vote_any(flag: bool) -> Vote:
    """Start a non-blocking vote of all ranks: is ``flag`` True on any of them?

    A collective (every rank calls it, in the same order as its other collectives) that
    never blocks the caller: it starts a MAX all_reduce of one CPU integer (no device
    sync) and returns at once. Read the outcome later with :meth:`Vote.result`; every rank
    reads the same value. The Trainer uses it to agree on a preemption stop at the same
    step on every rank. ``DEVLAYER_DEBUG`` does not check it (a check would block).

    Example:
        >>> import devlayer
        >>> _ = devlayer.init(backend="cpu")
        >>> vote_any(True).result()
        True
        >>> _ = devlayer.shutdown()
    """
    ctx = _ctx()
    torch = ctx.torch
    box = torch.tensor([1 if flag else 0], dtype=torch.int32, device="cpu")
    if ctx.world == 1:
        return Vote(ctx, box, None)
    rec = ctx.ledger.begin("vote_any", "async")  # done when its result is read
    try:
        work = ctx.dist.all_reduce(box, op=ctx.reduce_ops["max"], async_op=True)
    except RuntimeError as exc:
        Ledger.fail(rec)
        raise _fail(ctx, "vote_any", exc) from exc
    return Vote(ctx, box, work, rec)


def collective_ledger() -> Ledger:
    """The ledger this State's collectives record in (DDP's comm hook records there too).

    Example:
        >>> import devlayer
        >>> _ = devlayer.init(backend="cpu")
        >>> collective_ledger().n
        0
        >>> _ = devlayer.shutdown()
    """
    return _ctx().ledger
