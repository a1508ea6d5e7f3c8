"""The collective ledger (issue 22, item A): records, call sites, the bounded ring."""

from __future__ import annotations

import json

import pytest

import devlayer
from devlayer.ledger import DONE, FAILED, RUNNING, Ledger, current, describe, publish_step


def _user_call(led: Ledger) -> list[object]:
    return led.begin("all_reduce", ((4,), "torch.float32"))  # the call site: this line


def test_h22_1_a_record_names_the_user_call_site_and_its_state() -> None:
    """H22-1: a record carries sequence number, op, signature, the caller's file:line and
    function, its times and state (running, then done or failed); it is JSON-ready."""
    led = Ledger()
    rec = _user_call(led)
    (running,) = led.tail()
    assert running["state"] == RUNNING and running["ended"] is None
    assert running["site"].startswith("test_ledger.py:") and running["function"] == "_user_call"
    assert (running["seq"], running["op"], running["detail"]) == (0, "all_reduce", "[4] float32")
    Ledger.done(rec)
    Ledger.fail(led.begin("broadcast"))
    done, failed = led.tail()
    assert done["state"] == DONE and done["ended"] >= done["started"]
    assert (failed["seq"], failed["state"]) == (1, FAILED)
    json.dumps(led.tail())


def test_h22_1_the_ring_is_bounded() -> None:
    """H22-1: the ledger keeps only its newest records; sequence numbers keep counting."""
    led = Ledger(size=3)
    for _ in range(10):
        Ledger.done(led.begin("barrier"))
    assert [r["seq"] for r in led.tail()] == [7, 8, 9]
    assert [r["seq"] for r in led.tail(1)] == [9] and led.tail(0) == []


def test_describe() -> None:
    assert describe(((), "torch.int64")) == "[] int64"
    assert describe("dict of 2") == "dict of 2"


def test_h22_1_world_size_one_records_nothing(clean_env) -> None:
    """H22-1: at world size 1 there is no collective, so the ledger stays empty."""
    import torch

    with devlayer.init(backend="cpu"):
        devlayer.all_reduce(torch.ones(2))
        devlayer.barrier()
        led = current()
        assert led is not None and led.tail() == []


def test_publish_step() -> None:
    publish_step(5)
    try:
        assert devlayer.ledger.published_step() == 5
    finally:
        publish_step(None)


@pytest.mark.parametrize("size", [1, 2])
def test_tail_count(size: int) -> None:
    led = Ledger(size=size)
    Ledger.done(led.begin("x"))
    assert len(led.tail(5)) == 1
