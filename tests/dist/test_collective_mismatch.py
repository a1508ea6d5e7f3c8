"""Ranks that pass differently built arguments to a collective (issues 14 and 20).

Real two-rank gloo jobs started with ``devlayer.spawn``:

* Without ``DEVLAYER_DEBUG``: dicts whose keys are in a different order on each rank are
  paired by key, not by position (flat, nested, numbers, fast path, mixed key types,
  broadcast), and the result keeps each caller's key order.
* Without ``DEVLAYER_DEBUG`` (issue 20): every mismatch the campaign found (shapes, dtypes,
  keys, nesting, ops, broadcast shapes/keys/src, a skipped call, sizes gloo aborts on, a
  0-d tensor vs a number, uneven ``same_shape``, different collectives) raises the same
  :class:`CollectiveError` on both ranks (the first 64 collectives are all checked, then
  every 128th: a mismatch repeated in a loop is caught within 128 calls); Python numbers
  whose type differs between ranks reduce right, and ints stay exact past int64.
* With ``DEVLAYER_DEBUG=1``: a shape mismatch, a dtype mismatch,
  ``all_gather(same_shape=True)`` with uneven first dims and a skipped call raise the same
  :class:`CollectiveError` on every rank, naming both sides.
"""

from __future__ import annotations

import enum
from typing import Any

import pytest
import torch

import devlayer
from tests.dist.ranks import spawn_clean

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]


class Color(enum.Enum):
    RED = 1


def _ordered(r: int, items: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """``items`` as a dict, in the given order on rank 0 and reversed on rank 1."""
    return dict(items if r == 0 else items[::-1])


def _key_order_job() -> dict[str, Any]:
    r = devlayer.rank()
    out: dict[str, Any] = {}
    # The example: Python numbers (the general path).
    got = devlayer.all_reduce(_ordered(r, [("a", 1), ("b", 2)]), op="sum")
    out["numbers"] = list(got.items())
    # 0-d float tensors of one dtype: the metrics fast path. Values differ per key and rank.
    got = devlayer.all_reduce(
        _ordered(r, [(k, torch.tensor(float(10 * i + r))) for i, k in enumerate("zyxw")]), "sum"
    )
    out["fast"] = [(k, v.item()) for k, v in got.items()]
    # Same-dtype tensors of different shapes (flat dict of tensors, general path).
    got = devlayer.all_reduce(
        _ordered(r, [("long", torch.full((3,), 1.0 + r)), ("short", torch.full((2,), 5.0))]),
        "max",
    )
    out["shapes"] = [(k, v.tolist()) for k, v in got.items()]
    # Nested: dicts inside dicts and lists, numbers and tensors of two dtypes.
    inner = _ordered(r, [("p", torch.tensor([1 + r, 2 + r])), ("q", 3.0 * (r + 1))])
    nested = _ordered(
        r,
        [
            ("m", [inner, {"only": torch.tensor(7.0 + r)}]),
            ("n", torch.tensor([100.0 * (r + 1)])),
        ],
    )
    got = devlayer.all_reduce(nested, op="sum")
    out["nested"] = {
        "order": list(got),
        "inner_order": list(got["m"][0]),
        "p": got["m"][0]["p"].tolist(),
        "q": got["m"][0]["q"],
        "only": got["m"][1]["only"].item(),
        "n": got["n"].tolist(),
    }
    # Keys of mixed types (not orderable with <): paired by (type, repr).
    got = devlayer.all_reduce(
        _ordered(r, [(2, 1.0 + r), ("2", 10.0 * (r + 1)), (Color.RED, 100.0), ((1, "t"), 0.5)]),
        "sum",
    )
    out["mixed"] = [(repr(k), v) for k, v in got.items()]
    # broadcast pairs by key too.
    got = devlayer.broadcast(_ordered(r, [("seed", 10 + r), ("lr", torch.tensor(0.5 * r))]), 1)
    out["broadcast"] = {"order": list(got), "seed": got["seed"], "lr": got["lr"].item()}
    return out


def _debug_only_job() -> dict[str, str]:
    r = devlayer.rank()
    found: dict[str, str] = {}

    def expect_error(key: str, fn: Any) -> None:
        try:
            fn()
        except devlayer.CollectiveError as exc:
            found[key] = str(exc)
        else:
            found[key] = "(no CollectiveError)"

    expect_error("shape", lambda: devlayer.all_reduce(torch.ones(2 + r)))
    dtype = torch.float32 if r == 0 else torch.float64
    expect_error("dtype", lambda: devlayer.all_reduce(torch.ones(2, dtype=dtype)))
    expect_error("same_shape", lambda: devlayer.all_gather(torch.ones(2 + r, 3), same_shape=True))
    expect_error("skip", lambda: _skip_one(r, torch.ones(2), torch.ones(2)))
    found["after"] = str(devlayer.all_reduce(torch.ones(2)).tolist())  # the group still works
    return found


def _expect_error(found: dict[str, Any], key: str, fn: Any) -> None:
    """Run ``fn``; record its CollectiveError's text, or what it returned instead."""
    try:
        got = fn()
    except devlayer.CollectiveError as exc:
        found[key] = str(exc)
    else:
        found[key] = f"(no CollectiveError: {got!r})"


def _skip_one(r: int, a: torch.Tensor, b: torch.Tensor) -> None:
    """Rank 1 skips the first of two all_reduce calls with the same arguments."""
    if r == 0:
        devlayer.all_reduce(a)
    devlayer.all_reduce(b)


def _mismatch_cases(r: int) -> dict[str, Any]:
    """Every mismatch of issue 20 (items 13 and 14), on the same collective number."""
    t, f = torch.ones, torch.float32
    d = t(2) if r == 0 else t(2, dtype=torch.float64)
    return {
        "shape_2x3": lambda: devlayer.all_reduce(t(2, 3) if r == 0 else t(3, 2)),
        "f32_i32": lambda: devlayer.all_reduce(t(2, dtype=f if r == 0 else torch.int32)),
        "f16_bf16": lambda: devlayer.all_reduce(
            t(2, dtype=torch.float16 if r == 0 else torch.bfloat16)
        ),
        "keys": lambda: devlayer.all_reduce({"a": t(2), ("b" if r == 0 else "c"): t(3)}),
        "nested": lambda: devlayer.all_reduce({"a": {"b": t(2)} if r == 0 else t(2)}),
        "sum_max": lambda: devlayer.all_reduce(t(2), op="sum" if r == 0 else "max"),
        "sum_mean": lambda: devlayer.all_reduce(t(2), op="sum" if r == 0 else "mean"),
        "min_product": lambda: devlayer.all_reduce(t(2), op="min" if r == 0 else "product"),
        "broadcast_shape": lambda: devlayer.broadcast(t(2 + r)),
        "broadcast_keys": lambda: devlayer.broadcast({"a": 1, ("b" if r == 0 else "c"): t(2)}),
        "skip": lambda: _skip_one(r, t(2), t(2)),
        "1000_1001": lambda: devlayer.all_reduce(t(1000 + r)),
        "f32_f64": lambda: devlayer.all_reduce(d),
        "tensor0d_float": lambda: devlayer.all_reduce(torch.tensor(1.0) if r == 0 else 1.0),
        "same_shape": lambda: devlayer.all_gather(t(2 + r, 3), same_shape=True),
        "extra_key": lambda: devlayer.all_reduce({"a": 1.0, "b": 2.0, **({"c": 3.0} if r else {})}),
        "src": lambda: devlayer.broadcast(t(2), src=r),
        "reduce_broadcast": lambda: (
            devlayer.all_reduce(t(2)) if r == 0 else devlayer.broadcast(t(2))
        ),
        "gather_reduce": lambda: devlayer.all_gather(t(2)) if r == 0 else devlayer.all_reduce(t(2)),
        "objects": lambda: (
            devlayer.broadcast_object(1) if r == 0 else devlayer.all_gather_object(1)
        ),
    }


def _no_debug_job() -> dict[str, Any]:
    """Without DEVLAYER_DEBUG: each mismatch raises on both ranks, then the group works."""
    from devlayer.collective_checks import CHECK_EVERY, CHECK_FIRST
    from devlayer.comm import _ctx

    r = devlayer.rank()
    found: dict[str, Any] = {}
    for key, fn in _mismatch_cases(r).items():
        _expect_error(found, key, fn)
    found["after"] = devlayer.all_reduce(torch.full((3,), float(r + 1))).tolist()
    # Past the first CHECK_FIRST calls, only every CHECK_EVERY-th call is checked: a mismatch
    # that repeats (a training loop) is caught within CHECK_EVERY calls, on both ranks alike.
    while _ctx().calls.n <= CHECK_FIRST:
        devlayer.all_reduce(torch.ones(1))
    found["loop_caught_at"] = None
    for i in range(2 * CHECK_EVERY):
        try:
            devlayer.all_reduce(torch.ones(2), op="sum" if r == 0 else "max")
        except devlayer.CollectiveError:
            found["loop_caught_at"] = i
            break
    found["after_loop"] = devlayer.all_reduce(torch.ones(2)).tolist()
    return found


def _numbers_job() -> dict[str, Any]:
    """Python numbers whose type differs between the ranks, and ints past int64."""
    r = devlayer.rank()
    out: dict[str, Any] = {}

    def keep(key: str, fn: Any) -> None:
        try:
            value = fn()
        except devlayer.DevlayerError as exc:
            out[key] = f"{type(exc).__name__}: {exc}"
        else:
            out[key] = repr(value)

    keep("int_float", lambda: devlayer.all_reduce(1 if r == 0 else 1.5))
    keep("float_int", lambda: devlayer.all_reduce(1.5 if r == 0 else 1))
    keep("dict", lambda: devlayer.all_reduce({"correct": 0 if r == 0 else 2.5, "n": 2}))
    keep("nested", lambda: devlayer.all_reduce([True, {"x": (1 if r else 2.5, r)}]))
    keep("bools", lambda: devlayer.all_reduce([True, False]))
    keep("max", lambda: devlayer.all_reduce(5 if r == 0 else 1.5, op="max"))
    keep("min", lambda: devlayer.all_reduce(5 if r == 0 else 1.5, op="min"))
    keep("product", lambda: devlayer.all_reduce(3 if r == 0 else 0.5, op="product"))
    keep("int_product", lambda: devlayer.all_reduce(3 + r, op="product"))
    keep("mean", lambda: devlayer.all_reduce(1 if r == 0 else 2.0, op="mean"))
    keep("with_tensor", lambda: devlayer.all_reduce({"t": torch.ones(2), "n": 1 + r * 0.5}))
    keep("exact_2_53", lambda: devlayer.all_reduce(2**53 + 1))
    keep("exact_int64_max", lambda: devlayer.all_reduce(2**63 - 1 if r == 0 else -1))
    keep("past_int64", lambda: devlayer.all_reduce(2**62))
    keep("2_70", lambda: devlayer.all_reduce(2**70))
    keep("2_70_max", lambda: devlayer.all_reduce(2**70 if r == 0 else 1, op="max"))
    keep("huge", lambda: devlayer.all_reduce(2**2000 if r == 0 else 1))
    keep("broadcast_2_70", lambda: devlayer.broadcast(2**70 if r == 0 else 0))
    keep("gather_2_70", lambda: devlayer.all_gather(2**70 if r == 1 else 0))
    keep("after", lambda: devlayer.all_reduce(r + 1))
    return out


@pytest.fixture(scope="module")
def key_order() -> list[dict[str, Any]]:
    return spawn_clean(_key_order_job, timeout=30, join_timeout=150, env={})


@pytest.fixture(scope="module")
def debug_only() -> list[dict[str, str]]:
    return spawn_clean(_debug_only_job, timeout=30, join_timeout=150, env={"DEVLAYER_DEBUG": "1"})


def _caller_order(rank: int, keys: list[Any]) -> list[Any]:
    return keys if rank == 0 else keys[::-1]


def test_dict_of_numbers_in_another_key_order_is_paired_by_key(key_order):
    # The example: {'a': 1, 'b': 2} and {'b': 2, 'a': 1} used to give a=3, b=3.
    for rank, result in enumerate(key_order):
        assert result["numbers"] == [("a", 2), ("b", 4)][:: 1 if rank == 0 else -1], result


def test_metrics_fast_path_pairs_by_key_and_keeps_each_callers_order(key_order):
    expected = {k: float(2 * 10 * i + 1) for i, k in enumerate("zyxw")}  # (10i + 0) + (10i + 1)
    for rank, result in enumerate(key_order):
        keys = _caller_order(rank, list("zyxw"))
        assert result["fast"] == [(k, expected[k]) for k in keys], result["fast"]


def test_tensors_of_different_shapes_in_another_key_order(key_order):
    for rank, result in enumerate(key_order):
        want = {"long": [2.0, 2.0, 2.0], "short": [5.0, 5.0]}
        assert result["shapes"] == [(k, want[k]) for k in _caller_order(rank, ["long", "short"])]


def test_nested_dicts_in_another_key_order(key_order):
    for rank, result in enumerate(key_order):
        nested = result["nested"]
        assert nested["order"] == _caller_order(rank, ["m", "n"])
        assert nested["inner_order"] == _caller_order(rank, ["p", "q"])
        assert nested["p"] == [3, 5] and nested["q"] == 9.0 and nested["only"] == 15.0
        assert nested["n"] == [300.0]


def test_keys_of_mixed_types_are_paired_by_type_and_repr(key_order):
    want = {"2": 3.0, "'2'": 30.0, "<Color.RED: 1>": 200.0, "(1, 't')": 1.0}
    for rank, result in enumerate(key_order):
        keys = _caller_order(rank, ["2", "'2'", "<Color.RED: 1>", "(1, 't')"])
        assert result["mixed"] == [(k, want[k]) for k in keys], result["mixed"]


def test_broadcast_pairs_by_key(key_order):
    for rank, result in enumerate(key_order):
        assert result["broadcast"] == {
            "order": _caller_order(rank, ["seed", "lr"]),
            "seed": 11,
            "lr": 0.5,
        }


_DEBUG_ONLY = {
    "shape": "rank 0 all_reduce [2] float32 vs rank 1 all_reduce [3] float32",
    "dtype": "rank 0 all_reduce [2] float32 vs rank 1 all_reduce [2] float64",
    "same_shape": "rank 0 all_gather [2, 3] float32 (same_shape) vs rank 1 all_gather [3, 3] "
    "float32 (same_shape)",
    # R5-C3: a skipped call with the same arguments as the next one (it was not caught)
    "skip": "rank 0 all_reduce [2] float32 called at test_collective_mismatch.py:",
}


@pytest.mark.parametrize("case", sorted(_DEBUG_ONLY))
def test_debug_mode_names_both_sides_of_shape_dtype_and_same_shape_mismatches(debug_only, case):
    messages = [result[case] for result in debug_only]
    for rank, message in enumerate(messages):
        assert _DEBUG_ONLY[case] in message, message
        assert f"raised on rank {rank} of 2" in message, message
    assert [result["after"] for result in debug_only] == ["[2.0, 2.0]"] * 2


@pytest.fixture(scope="module")
def no_debug() -> list[dict[str, Any]]:
    """Both jobs in one 2-rank spawn without DEVLAYER_DEBUG (a spawn costs seconds)."""
    return spawn_clean(_no_debug_and_numbers_job, timeout=30, join_timeout=200, env={})


def _no_debug_and_numbers_job() -> dict[str, Any]:
    return {"mismatch": _no_debug_job(), "numbers": _numbers_job()}


_NO_DEBUG: dict[str, str | tuple[str, ...]] = {
    "shape_2x3": "rank 0 all_reduce [2, 3] float32 vs rank 1 all_reduce [3, 2] float32",
    "f32_i32": "rank 0 all_reduce [2] float32 vs rank 1 all_reduce [2] int32",
    "f16_bf16": "rank 0 all_reduce [2] float16 vs rank 1 all_reduce [2] bfloat16",
    "keys": "rank 0 all_reduce float32[5], leaf 1: ['b'] [3] float32 vs rank 1 all_reduce "
    "float32[5], leaf 1: ['c'] [3] float32",
    "nested": "rank 0 all_reduce float32[2], leaf 0: ['a']['b'] [2] float32 vs rank 1 "
    "all_reduce float32[2], leaf 0: ['a'] [2] float32",
    "sum_max": "rank 0 all_reduce(sum) [2] float32 vs rank 1 all_reduce(max) [2] float32",
    "sum_mean": "rank 0 all_reduce(sum) [2] float32 vs rank 1 all_reduce(mean) [2] float32",
    "min_product": "rank 0 all_reduce(min) [2] float32 vs rank 1 all_reduce(product) [2] float32",
    "broadcast_shape": "rank 0 broadcast [2] float32 vs rank 1 broadcast [3] float32",
    "broadcast_keys": "leaf 1: ['b'] [2] float32 vs rank 1 broadcast 1 number(s) + float32[2], "
    "leaf 1: ['c'] [2] float32",
    "skip": "rank 0 all_reduce [2] float32 called at test_collective_mismatch.py:",
    "1000_1001": "rank 0 all_reduce [1000] float32 vs rank 1 all_reduce [1001] float32",
    "f32_f64": "rank 0 all_reduce [2] float32 vs rank 1 all_reduce [2] float64",
    "tensor0d_float": "rank 0 all_reduce [] float32 vs rank 1 all_reduce float64[1]",
    "same_shape": "rank 0 all_gather [2, 3] float32 (same_shape) vs rank 1 all_gather [3, 3] "
    "float32 (same_shape)",
    "extra_key": "rank 0 all_reduce float64[2], no leaf 2 vs rank 1 all_reduce float64[3], "
    "leaf 2: ['c'] number",
    "src": "rank 0 broadcast [2] float32 src=0 vs rank 1 broadcast [2] float32 src=1",
    "reduce_broadcast": "rank 0 all_reduce(sum) [2] float32 vs rank 1 broadcast [2] float32",
    "gather_reduce": "rank 0 all_gather [*] float32 vs rank 1 all_reduce(sum) [2] float32",
    "objects": ("rank 0 broadcast_object src=0", "vs rank 1 all_gather_object"),
}


@pytest.mark.parametrize("case", sorted(_NO_DEBUG))
def test_r5_c3_mismatches_raise_on_every_rank_without_debug(no_debug, case):
    """R5-C3/R5-C4: without DEVLAYER_DEBUG, each mismatch of issue 20 (shapes, dtypes, keys,
    nesting, ops, broadcast shapes/keys/src, a skipped call, sizes gloo aborts on, 0-d tensor
    vs number, uneven same_shape, different collectives) raises the same CollectiveError naming
    both sides on both ranks (the spawn returning means both exited 0), and the group still
    reduces correctly afterwards."""
    messages = [result["mismatch"][case] for result in no_debug]
    expected = _NO_DEBUG[case]
    for rank, message in enumerate(messages):
        for part in (expected,) if isinstance(expected, str) else expected:
            assert part in message, message
        assert f"raised on rank {rank} of 2" in message, message
    assert messages[0].replace("on rank 0 of", "on rank 1 of") == messages[1]
    assert [result["mismatch"]["after"] for result in no_debug] == [[3.0, 3.0, 3.0]] * 2


def test_r5_c3_a_skipped_call_names_both_call_sites(no_debug):
    """R5-C3: rank 1 skips an all_reduce whose arguments equal the next call's; the call
    sites (file:line) differ, so both ranks raise naming both lines."""
    message = no_debug[0]["mismatch"]["skip"]
    sites = [m.split(" ")[0] for m in message.split("called at ")[1:]]
    assert len(sites) == 2 and sites[0] != sites[1], message


def test_r5_c5_sampled_check_catches_a_repeating_mismatch(no_debug):
    """R5-C5: past the first CHECK_FIRST collectives only every CHECK_EVERY-th is checked; a
    mismatch repeated in a loop (sum vs max, same size) is caught within CHECK_EVERY calls, at
    the same call on both ranks, and the group works afterwards."""
    from devlayer.collective_checks import CHECK_EVERY

    caught = [result["mismatch"]["loop_caught_at"] for result in no_debug]
    assert caught[0] is not None and caught[0] == caught[1] and caught[0] < CHECK_EVERY, caught
    assert [result["mismatch"]["after_loop"] for result in no_debug] == [[2.0, 2.0]] * 2


_NUMBERS = {
    "int_float": "2.5",
    "float_int": "2.5",
    "dict": "{'correct': 2.5, 'n': 4}",
    "nested": "[2, {'x': (3.5, 1)}]",
    "bools": "[2, 0]",
    "max": "5.0",
    "min": "1.5",
    "product": "1.5",
    "int_product": "12",
    "mean": "1.5",
    "exact_2_53": str(2 * (2**53 + 1)),
    "exact_int64_max": str(2**63 - 2),
    "past_int64": str(2**63),
    "2_70": str(2**71),
    "after": "3",
}


@pytest.mark.parametrize("case", sorted(_NUMBERS))
def test_r5_c1_numbers_of_either_type_reduce_right_on_every_rank(no_debug, case):
    """R5-C1/R5-C2: an int on one rank and a float on the other (alone, in dicts, lists and
    tuples, bools too) reduce to the same value on both ranks: a float if any rank gave a
    float, else an exact int, even past int64 (2**62 + 2**62, 2**70 + 2**70)."""
    assert [result["numbers"][case] for result in no_debug] == [_NUMBERS[case]] * 2


def test_r5_c1_tensors_beside_numbers_keep_their_values(no_debug):
    """R5-C1: a tensor and a number of either type in one dict: both right on both ranks."""
    for result in no_debug:
        assert result["numbers"]["with_tensor"] == "{'t': tensor([2., 2.]), 'n': 2.5}"


_OVERFLOWS = {
    "2_70_max": "all_reduce(op='max') of Python ints at value",
    "huge": "all_reduce(op='sum') of Python ints at value: the result (about inf)",
    "broadcast_2_70": "broadcast: rank 0 passed an int outside int64",
    "gather_2_70": "all_gather: rank 1 passed an int outside int64",
}


@pytest.mark.parametrize("case", sorted(_OVERFLOWS))
def test_r5_c2_ints_that_cannot_be_exact_raise_on_every_rank(no_debug, case):
    """R5-C2: where an int result cannot be exact (max over an int past int64, a sum past the
    float range, broadcast or all_gather of an int past int64) every rank raises the same
    InvalidArgumentError naming the op and the fix, instead of a wrapped value or a raw
    ValueError on one rank."""
    messages = [result["numbers"][case] for result in no_debug]
    for message in messages:
        assert message.startswith("InvalidArgumentError: "), message
        assert _OVERFLOWS[case] in message and "float(x)" in message, message
