"""Ranks that pass differently built arguments to a collective (issue 14, item 1).

Real two-rank gloo jobs started with ``devlayer.spawn``:

* Without ``DEVLAYER_DEBUG``: dicts whose keys are in a different order on each rank are
  paired by key, not by position (flat, nested, numbers, fast path, mixed key types,
  broadcast), and the result keeps each caller's key order.
* With ``DEVLAYER_DEBUG=1``: a shape mismatch, a dtype mismatch and
  ``all_gather(same_shape=True)`` with uneven first dims raise the same
  :class:`CollectiveError` on every rank, naming both sides. These stay debug-only: gloo
  aborts the process (SIGABRT) as soon as two ranks' buffers differ in size, so catching them
  needs one more small collective before the data, which costs more than the overhead
  targets allow (docs/performance.md, "Always-on argument check").
"""

from __future__ import annotations

import enum
import os
from typing import Any

import pytest
import torch

import devlayer
from tests.helpers import _LAUNCH_NAMES, _LAUNCH_PREFIXES

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
    found["after"] = str(devlayer.all_reduce(torch.ones(2)).tolist())  # the group still works
    return found


@pytest.fixture(scope="module")
def clean_launch_env():
    with pytest.MonkeyPatch.context() as mp:  # what clean_env does, for module fixtures
        for key in list(os.environ):
            if key.startswith(_LAUNCH_PREFIXES) or key in _LAUNCH_NAMES:
                mp.delenv(key)
        yield


@pytest.fixture(scope="module")
def key_order(clean_launch_env) -> list[dict[str, Any]]:
    return devlayer.spawn(
        _key_order_job, nprocs=2, backend="cpu", timeout=30, join_timeout=150, env={}
    )


@pytest.fixture(scope="module")
def debug_only(clean_launch_env) -> list[dict[str, str]]:
    return devlayer.spawn(
        _debug_only_job,
        nprocs=2,
        backend="cpu",
        timeout=30,
        join_timeout=150,
        env={"DEVLAYER_DEBUG": "1"},
    )


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
}


@pytest.mark.parametrize("case", sorted(_DEBUG_ONLY))
def test_debug_mode_names_both_sides_of_shape_dtype_and_same_shape_mismatches(debug_only, case):
    messages = [result[case] for result in debug_only]
    for rank, message in enumerate(messages):
        assert _DEBUG_ONLY[case] in message, message
        assert f"raised on rank {rank} of 2" in message, message
    assert [result["after"] for result in debug_only] == ["[2.0, 2.0]"] * 2
