"""Collective argument handling at world size 1 (the multi-rank values are tested in dist/)."""

from __future__ import annotations

import collections
import math

import pytest
import torch

import devlayer


@pytest.fixture
def cpu(clean_env):
    with devlayer.init(backend="cpu") as st:
        yield st


def test_collectives_before_init_say_what_to_do(clean_env):
    with pytest.raises(devlayer.errors.NotInitializedError, match=r"call devlayer\.init\(\) first"):
        devlayer.all_reduce(1.0)
    with pytest.raises(devlayer.errors.NotInitializedError):
        devlayer.rank()


def test_unknown_op_is_named(cpu):
    with pytest.raises(devlayer.errors.InvalidArgumentError, match="op='median'"):
        devlayer.all_reduce(torch.ones(1), op="median")
    assert devlayer.all_reduce(2.0, op="avg") == 2.0  # alias of mean


def test_bad_leaf_type_is_named_with_its_path(cpu):
    with pytest.raises(devlayer.errors.InvalidArgumentError, match=r"\['a'\]\['b'\] has type str"):
        devlayer.all_reduce({"a": {"b": "text"}, "c": 1.0})
    with pytest.raises(devlayer.errors.InvalidArgumentError, match=r"\[1\] has type NoneType"):
        devlayer.broadcast([1, None])


def test_mean_of_integer_tensor_is_refused_with_its_path(cpu):
    with pytest.raises(
        devlayer.errors.InvalidArgumentError, match=r"\['count'\] with dtype torch.int64"
    ):
        devlayer.all_reduce({"loss": torch.ones(()), "count": torch.tensor(3)}, op="mean")


def test_structures_keep_their_types(cpu):
    Pair = collections.namedtuple("Pair", "a b")
    value = {"p": Pair(1, 2.0), "t": (torch.ones(2),), "l": [3], "o": collections.OrderedDict(x=1)}
    out = devlayer.all_reduce(value, op="sum")
    assert isinstance(out["p"], Pair) and out["p"] == Pair(1, 2.0)
    assert isinstance(out["t"], tuple) and out["t"][0] is value["t"][0]
    assert isinstance(out["o"], collections.OrderedDict)


def test_broadcast_and_gather_arguments(cpu):
    with pytest.raises(devlayer.errors.InvalidArgumentError, match="src=1"):
        devlayer.broadcast(1.0, src=1)
    with pytest.raises(devlayer.errors.InvalidArgumentError, match="all_gather_object"):
        devlayer.all_gather("text")
    assert devlayer.all_gather(3) == [3]
    assert devlayer.broadcast_object({"k": 1}) == {"k": 1}


def test_barrier_timeout_is_validated(cpu):
    with pytest.raises(devlayer.errors.InvalidArgumentError, match="timeout=-1"):
        devlayer.barrier(timeout=-1)
    devlayer.barrier(timeout=1)


def test_dict_results_keep_the_callers_key_order(cpu):
    # Leaves are sent in key order (tests/dist/test_collective_mismatch.py); results are not.
    value = {"b": 1, "a": torch.ones(2), 3: {"z": 2.0, "y": (4,)}, (1, "t"): 5}
    out = devlayer.all_reduce(value, op="sum")
    assert list(out) == ["b", "a", 3, (1, "t")] and list(out[3]) == ["z", "y"]
    assert out["a"] is value["a"] and out[3]["y"] == (4,)
    flat = {"y": torch.ones(()), "x": torch.zeros(())}
    assert list(devlayer.all_reduce(flat)) == ["y", "x"]
    assert list(devlayer.broadcast({"q": 1, "p": 2})) == ["q", "p"]


# --------------------------------------------------------------------------- issue 20


def _reduce_numbers(per_rank: list[list[object]], op: str) -> list[object]:
    """What the exact path of all_reduce of Python numbers gives, ranks simulated: encode on
    every rank, reduce the slots as int64 and float64 collectives would (int64 wraps),
    decode."""
    import math

    from devlayer.numbers import decode, encode, wrap_int64

    encoded = [encode(values, op) for values in per_rank]  # type: ignore[arg-type]
    combine = {"sum": sum, "mean": sum, "max": max, "min": min, "product": math.prod}[op]
    ints = [wrap_int64(combine(col)) for col in zip(*(e[0] for e in encoded), strict=True)]
    floats = [float(combine(col)) for col in zip(*(e[1] for e in encoded), strict=True)]
    if op == "mean":
        return [f / len(per_rank) for f in floats]
    return decode(per_rank[0], op, ints, floats, eps=2.0**-52, world=len(per_rank))  # type: ignore[arg-type]


_C1_CASES = [
    ([[1], [1.5]], "sum", [2.5]),
    ([[1.5], [1]], "sum", [2.5]),
    ([[0], [2.5], [1]], "sum", [3.5]),
    ([[True], [True]], "sum", [2]),
    ([[5], [1.5]], "max", [5.0]),
    ([[5], [1.5]], "min", [1.5]),
    ([[3], [0.5]], "product", [1.5]),
    ([[3], [4]], "product", [12]),
    ([[1], [2.0]], "mean", [1.5]),
    ([[2**53 + 1], [2**53 + 1]], "sum", [2**54 + 2]),
    ([[2**63 - 1], [-1]], "sum", [2**63 - 2]),
    ([[2**62], [2**62]], "sum", [2**63]),
    ([[2**70], [2**70]], "sum", [2**71]),
    ([[-(2**63)], [-1]], "sum", [-(2**63) - 1]),
    ([[2**40], [2**40]], "product", [2**80]),
    ([[7, 1.0], [-3, 2]], "min", [-3, 1.0]),
]


@pytest.mark.parametrize(("per_rank", "op", "expected"), _C1_CASES)
def test_r5_c1_number_types_and_ints_past_int64(per_rank, op, expected):
    """R5-C1/R5-C2: int and float at the same place give a float on every rank (the type
    rule uses only reduced values, so it is the same everywhere), ints give exact ints, even
    past int64 (the float tells how often int64 wrapped)."""
    got = _reduce_numbers(per_rank, op)
    assert got == expected and [type(v) for v in got] == [type(v) for v in expected], got


_C2_CASES = [
    ([[2**70], [1]], "max", r"all_reduce\(op='max'\) of Python ints at number 0"),
    ([[2**2000], [1]], "sum", r"about inf.*this rank passed 1{1}"),
    ([[2**120], [2**120]], "sum", r"cannot be computed exactly"),
    ([[2**70], [2**70]], "product", r"pass floats \(float\(x\)\)"),
]


@pytest.mark.parametrize(("per_rank", "op", "match"), _C2_CASES)
def test_r5_c2_inexact_int_results_raise_naming_value_op_and_fix(per_rank, op, match):
    """R5-C2: where int64 and the float cannot give the exact int (max over an int past int64,
    a result past the float range or past about 2**100), the error names the op, this rank's
    value, the approximate result and the fix; it depends on reduced values only, so every
    rank raises it."""
    with pytest.raises(devlayer.errors.InvalidArgumentError, match=match):
        _reduce_numbers(per_rank, op)


def _reduce_in(dtype: torch.dtype, op: str, per_rank: list[list[float]]) -> list[float]:
    """The slots reduced in ``dtype`` as a collective would, one rank after another."""
    combine = {
        "sum": torch.add,
        "mean": torch.add,
        "max": torch.maximum,
        "min": torch.minimum,
        "product": torch.mul,
    }[op]
    acc = torch.tensor(per_rank[0], dtype=dtype)
    for slots in per_rank[1:]:
        acc = combine(acc, torch.tensor(slots, dtype=dtype))
    return (acc / len(per_rank) if op == "mean" else acc).tolist()


def _reduce_numbers_as_comm(
    per_rank: list[list[object]], op: str, dtype: torch.dtype = torch.float64
) -> tuple[list[object], int]:
    """What all_reduce of Python numbers gives, ranks simulated, and how many collectives:
    the float slots of ``pack`` reduced in ``dtype`` (float32 on MPS); the exact int64 path
    only where ``unpack`` says an int result may be inexact."""
    from devlayer.numbers import decode, encode, pack, unpack, wrap_int64

    eps, world, n = torch.finfo(dtype).eps, len(per_rank), len(per_rank[0])
    packed = [pack(values, op, eps=eps, world=world) for values in per_rank]  # type: ignore[arg-type]
    reduced = _reduce_in(dtype, op, packed)
    got = unpack(reduced, op, n, eps=eps, world=world)
    if got is not None:
        return got, 1  # type: ignore[return-value]
    combine = {"sum": sum, "max": max, "min": min, "product": math.prod}[op]
    encoded = [encode(values, op)[0] for values in per_rank]  # type: ignore[arg-type]
    ints = [wrap_int64(combine(col)) for col in zip(*encoded, strict=True)]
    return decode(per_rank[0], op, ints, reduced[:n], eps=eps, world=world), 2  # type: ignore[arg-type]


@pytest.mark.parametrize(("per_rank", "op", "expected"), _C1_CASES)
def test_r5_c8_one_float_collective_gives_what_r5_c1_promises(per_rank, op, expected):
    """R5-C8: the float slots with their flags (one collective), and the exact int64 path only
    where unpack asks for it, give every R5-C1 result with its type; ints past 2**52 take the
    exact path, and so do int results past it; the others take one collective."""
    got, collectives = _reduce_numbers_as_comm(per_rank, op)
    assert got == expected and [type(v) for v in got] == [type(v) for v in expected], got
    large = any(isinstance(v, int) and abs(v) > 2**52 for r in per_rank for v in r) or any(
        type(v) is int and abs(v) >= 2**53 for v in expected
    )
    assert collectives == (2 if large else 1), collectives


@pytest.mark.parametrize(("per_rank", "op", "match"), _C2_CASES)
def test_r5_c8_inexact_int_results_still_raise_on_the_exact_path(per_rank, op, match):
    """R5-C8: the R5-C2 cases reach the exact path and raise the same InvalidArgumentError."""
    with pytest.raises(devlayer.errors.InvalidArgumentError, match=match):
        _reduce_numbers_as_comm(per_rank, op)


@pytest.mark.parametrize(
    ("per_rank", "op", "dtype", "expected", "collectives"),
    [
        # A partial sum past 2**53 rounds (2**53 + 1 -> 2**53) although the result is below
        # it: an int at or past 2**53 / world takes the exact path.
        ([[2**53 - 1], [2], [-2]], "sum", torch.float64, 2**53 - 1, 2),
        ([[2**51], [2**51 + 1]], "sum", torch.float64, 2**52 + 1, 1),
        ([[2**52 + 1], [2**52 + 1]], "sum", torch.float64, 2**53 + 2, 2),
        # A product of small ints that grows past 2**53: the result says so.
        ([[2**30 + 1], [2**30 + 1]], "product", torch.float64, (2**30 + 1) ** 2, 2),
        ([[2**26], [2**26 - 1]], "product", torch.float64, 2**52 - 2**26, 1),
        ([[0], [-5]], "product", torch.float64, 0, 1),
        ([[2**53 + 1], [3]], "max", torch.float64, 2**53 + 1, 2),
        ([[-(2**53) + 1], [3]], "min", torch.float64, -(2**53) + 1, 1),
        # float32 (MPS): the bound is 2**24.
        ([[2**23 - 1], [2**23 - 1]], "sum", torch.float32, 2**24 - 2, 1),
        ([[2**23 + 1], [2**23 + 1]], "sum", torch.float32, 2**24 + 2, 2),
        ([[4097], [4097]], "product", torch.float32, 4097**2, 2),
        ([[2**24 + 1], [1]], "max", torch.float32, 2**24 + 1, 2),
        ([[3], [1.5]], "sum", torch.float32, 4.5, 1),
    ],
)
def test_r5_c8_int_results_the_float_cannot_hold_take_the_exact_path(
    per_rank, op, dtype, expected, collectives
):
    """R5-C8: an int result stays exact where the float would round it (a partial sum past
    2**53, a product that grows past it, an int past it under max; 2**24 for float32), by
    taking the exact path; ints the float holds exactly take one collective."""
    got = _reduce_numbers_as_comm(per_rank, op, dtype)
    assert got == ([expected], collectives) and type(got[0][0]) is type(expected), got


def test_r5_c5_checked_calls_depend_on_the_sequence_number_only():
    """R5-C5: the first CHECK_FIRST collectives are checked, then every CHECK_EVERY-th;
    DEVLAYER_DEBUG checks all. A pure function of the per-State count, so ranks agree."""
    from devlayer.collective_checks import CHECK_EVERY, CHECK_FIRST, is_checked

    checked = [n for n in range(CHECK_FIRST + 3 * CHECK_EVERY) if is_checked(n, debug=False)]
    assert checked[:CHECK_FIRST] == list(range(CHECK_FIRST))
    assert checked[CHECK_FIRST:] == [
        n for n in range(CHECK_FIRST, CHECK_FIRST + 3 * CHECK_EVERY) if n % CHECK_EVERY == 0
    ]
    assert len(checked) - CHECK_FIRST <= 3
    assert all(is_checked(n, debug=True) for n in range(500))


def test_r5_c3_mismatch_message_names_call_sites_and_numbers_only_when_they_differ():
    """R5-C3: the signature holds the call site and the sequence number; the message shows
    them only where the ranks differ, so a skipped call names both lines."""
    from devlayer.collective_checks import mismatch_error

    base = ["all_reduce", "sum", "[2] float32", None, [], "job.py:10", 4]
    assert mismatch_error([base, list(base)], rank=0) is None
    skipped = mismatch_error([base, [*base[:5], "job.py:11", 4]], rank=1)
    assert skipped is not None and (
        "rank 0 all_reduce [2] float32 called at job.py:10 vs rank 1 all_reduce [2] float32 "
        "called at job.py:11" in str(skipped)
    )
    assert "collective #4" in str(skipped) and "raised on rank 1 of 2" in str(skipped)
    assert "call it from one line (x = all_reduce(a if rank == 0 else b))" in str(skipped)
    shape = mismatch_error([base, [base[0], "sum", "[3] float32", *base[3:]]], rank=0)
    assert "rank 0 all_reduce [2] float32 vs rank 1 all_reduce [3] float32." in str(shape)
    assert "Only the calling lines differ" not in str(shape)
    two = ["all_reduce", "sum", "float64[2]", None, ["['a'] number", "['b'] number"], "j:1", 0]
    three = [*two[:2], "float64[3]", None, [*two[4], "['c'] number"], "j:1", 0]
    extra = str(mismatch_error([two, three], rank=0))
    assert "float64[2], no leaf 2 vs rank 1 all_reduce float64[3], leaf 2: ['c'] number" in extra


def test_r5_c6_key_pairing_order_sorts_keys_whatever_the_callers_order(cpu):
    """R5-C6: dict values are sent in sorted key order (strings as strings, other mixes by
    type and repr), the same whatever order a rank built its dict in; the result keeps the
    caller's order. A change that sends in insertion order fails here, without processes."""
    from devlayer.tree import flatten, pairing_order

    assert pairing_order({"b": 1, "a": 2, "c": 3}) == ["a", "b", "c"]
    assert pairing_order({"c": 3, "a": 2, "b": 1}) == ["a", "b", "c"]
    assert pairing_order({2: 0, "2": 0, 1: 0}) == [1, 2, "2"]
    leaves: list[object] = []
    flatten({"z": 1, "a": {"y": 2, "b": 3}}, leaves, torch)
    assert leaves == [3, 2, 1]
    out = devlayer.all_reduce({"z": 1, "a": 2})
    assert list(out) == ["z", "a"] and out == {"z": 1, "a": 2}


def test_r5_c7_cycles_and_deep_nesting_are_named_not_recursion_errors(cpu):
    """R5-C7: a self-referencing list or dict, and nesting past MAX_DEPTH (10,000 deep), raise
    InvalidArgumentError naming the cycle's path or the depth limit, not RecursionError."""
    from devlayer.tree import MAX_DEPTH

    loop: list[object] = [1.0]
    loop.append(loop)
    with pytest.raises(
        devlayer.errors.InvalidArgumentError, match=r"\[1\] is the argument itself: a cycle"
    ):
        devlayer.all_reduce(loop)
    inner: dict[str, object] = {"x": 1.0}
    outer = {"a": [inner]}
    inner["back"] = outer["a"]
    with pytest.raises(
        devlayer.errors.InvalidArgumentError, match=r"\['a'\]\[0\]\['back'\] is \['a'\]: a cycle"
    ):
        devlayer.broadcast(outer)
    deep: object = 1.0
    for _ in range(10_000):
        deep = [deep]
    with pytest.raises(devlayer.errors.InvalidArgumentError, match=f"more than {MAX_DEPTH} deep"):
        devlayer.all_reduce(deep)
    ok: object = 1.0
    for _ in range(MAX_DEPTH - 1):
        ok = [ok]
    assert devlayer.all_reduce(ok) == ok  # the limit itself is allowed
