"""How many collectives ``all_reduce`` of Python numbers costs (issue 20, item 7).

A real two-rank gloo job started with ``devlayer.spawn`` wraps
``torch.distributed.all_reduce`` and counts its calls per ``devlayer.all_reduce``, less
the sampled signature check (one digest all_reduce on the calls
:func:`devlayer.collective_checks.is_checked` picks): numbers take ONE collective in the
common case, and two (the exact int64 path, on both ranks alike) only where an int result
could be inexact in the float.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import devlayer
from tests.dist.ranks import spawn_clean

pytestmark = [pytest.mark.dist, pytest.mark.timeout(240)]


def _cases(r: int) -> dict[str, Any]:
    """Each case's call on rank ``r`` (0 or 1)."""
    f64 = torch.float64
    return {
        "float": lambda: devlayer.all_reduce(1.5),
        "dict": lambda: devlayer.all_reduce({"a": 1, "b": 2.5}),
        "int_sum": lambda: devlayer.all_reduce(3 + r),
        "int_sum_2_51": lambda: devlayer.all_reduce(2**51 + r),
        "int_float": lambda: devlayer.all_reduce(1 if r == 0 else 1.5),
        "with_float64": lambda: devlayer.all_reduce({"t": torch.ones(2, dtype=f64), "n": 1}),
        "max": lambda: devlayer.all_reduce(5 if r == 0 else -7, op="max"),
        "min": lambda: devlayer.all_reduce(5 if r == 0 else -7, op="min"),
        "product": lambda: devlayer.all_reduce(3 + r, op="product"),
        "mean": lambda: devlayer.all_reduce(1 + r, op="mean"),
        "past_2_53": lambda: devlayer.all_reduce(2**53 + 1),
        "sum_grows_past_2_53": lambda: devlayer.all_reduce(2**52 + 1),
        "product_grows_past_2_53": lambda: devlayer.all_reduce(2**30 + 1, op="product"),
        "past_int64": lambda: devlayer.all_reduce(2**62),
        "max_past_2_53": lambda: devlayer.all_reduce(2**60 + 1 if r == 0 else 1, op="max"),
    }


def _count_job() -> dict[str, tuple[str, int]]:
    """Each case's result and how many all_reduce calls it made beside the signature check."""
    import torch.distributed as dist

    from devlayer.collective_checks import CHECK_FIRST, is_checked
    from devlayer.comm import _ctx

    while _ctx().calls.n < CHECK_FIRST:  # past the calls that are all checked
        devlayer.all_reduce(torch.ones(1))
    calls = [0]
    real = dist.all_reduce

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    out: dict[str, tuple[str, int]] = {}
    dist.all_reduce = counting
    try:
        for key, fn in _cases(devlayer.rank()).items():
            checked = is_checked(_ctx().calls.n, debug=False)
            calls[0] = 0
            result = fn()
            out[key] = (repr(result), calls[0] - int(checked))
    finally:
        dist.all_reduce = real
    return out


@pytest.fixture(scope="module")
def counted() -> list[dict[str, tuple[str, int]]]:
    """One 2-rank spawn for every case (a spawn costs seconds), launch variables cleared."""
    return spawn_clean(_count_job, timeout=30, join_timeout=150, env={})


_ONE = {
    "float": "3.0",
    "dict": "{'a': 2, 'b': 5.0}",
    "int_sum": "7",
    "int_sum_2_51": str(2**52 + 1),
    "int_float": "2.5",
    "with_float64": "{'t': tensor([2., 2.], dtype=torch.float64), 'n': 2}",
    "max": "5",
    "min": "-7",
    "product": "12",
    "mean": "1.5",
}

_TWO = {
    "past_2_53": str(2 * (2**53 + 1)),
    "sum_grows_past_2_53": str(2**53 + 2),
    "product_grows_past_2_53": str((2**30 + 1) ** 2),
    "past_int64": str(2**63),
    "max_past_2_53": str(2**60 + 1),
}


@pytest.mark.parametrize("case", sorted(_ONE))
def test_r5_c8_numbers_take_one_collective_in_the_common_case(counted, case):
    """R5-C8: floats, ints whose result the float64 holds exactly, an int beside a float, a
    dict of both, numbers beside a float64 tensor: the right value (same type rule as
    R5-C1) on both ranks, in ONE torch.distributed.all_reduce (the signature check aside)."""
    assert [result[case] for result in counted] == [(_ONE[case], 1)] * 2


@pytest.mark.parametrize("case", sorted(_TWO))
def test_r5_c8_int_results_past_2_53_take_the_exact_path_and_stay_exact(counted, case):
    """R5-C8: an int too large for float64 on a rank (2**53 + 1, 2**62), or a sum or product
    that grows past 2**53 from smaller ints, takes the exact int64 path on both ranks (a
    second collective) and gives the exact Python int."""
    assert [result[case] for result in counted] == [(_TWO[case], 2)] * 2
