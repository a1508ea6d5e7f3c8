"""Collective argument handling at world size 1 (the multi-rank values are tested in dist/)."""

from __future__ import annotations

import collections

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
