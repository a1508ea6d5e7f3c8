"""The collective ledger (issue 22, item A): records, call sites, the bounded ring."""

from __future__ import annotations

import json

import pytest

import devlayer
from devlayer.ledger import DETAIL, DONE, FAILED, RUNNING, Ledger, current, describe, publish_step


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
    assert done["state"] == DONE and done["ended"] is None  # done costs no clock read
    assert (failed["seq"], failed["state"]) == (1, FAILED)
    assert failed["ended"] >= failed["started"]
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


def _begin_deep_in_a_function(led: Ledger) -> int:
    """Begins a record several lines into a function; returns that line."""
    here = _line_of_next_statement()
    led.begin("broadcast", "dict of 2")
    return here


def _line_of_next_statement() -> int:
    import sys

    return sys._getframe(1).f_lineno + 1


def test_h22_p1_the_call_site_is_read_after_the_callers_frame_is_gone() -> None:
    """H22-P1: a record keeps the call site's code object and instruction offset, never the
    frame; once the caller has returned, the report still names its file:line and function
    (the line worked out lazily from the code object, as ``frame.f_lineno`` would give)."""
    import types

    led = Ledger()
    line = _begin_deep_in_a_function(led)  # that function's frame is gone now
    (rec,) = list(led.records)
    assert not any(isinstance(v, types.FrameType) for v in rec)
    (entry,) = led.tail()
    assert entry["site"] == f"test_ledger.py:{line}"
    assert entry["function"] == "_begin_deep_in_a_function"
    assert entry["file"] == __file__


def _collectives_at_known_lines() -> dict[str, int]:
    """Each depth-hinted path called from a known line of this function (a helper, so that
    the function name in the records is this one's)."""
    import torch

    from devlayer.comm import vote_any  # the Trainer's, not exported

    lines = {}
    lines["all_reduce tensor"] = _line_of_next_statement()
    devlayer.all_reduce(torch.ones(3))
    lines["all_reduce dict"] = _line_of_next_statement()
    devlayer.all_reduce({"loss": 1.5})
    lines["broadcast"] = _line_of_next_statement()
    devlayer.broadcast(torch.ones(2), src=0)
    lines["vote_any"] = _line_of_next_statement()
    vote_any(False).result()
    return lines


class _OneRankGroup:
    """``torch.distributed`` for a world of two ranks that agree with this one: each
    collective leaves the buffer as it is (the other rank sent the same)."""

    class _Work:
        def wait(self, *args: object) -> bool:
            return True

    def all_reduce(self, buf: object, op: object = None, async_op: bool = False) -> object:
        return self._Work() if async_op else None

    def broadcast(self, buf: object, src: int = 0, async_op: bool = False) -> object:
        return self._Work() if async_op else None


def test_h22_p2_each_collective_records_the_users_line_with_its_depth_hint(
    clean_env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """H22-P2: the hot paths start the search for the user's frame at a fixed depth (one
    frame object instead of one per devlayer frame); for every path that does (all_reduce of
    a tensor and of a container, broadcast, vote_any) the record names the caller's exact
    line and function, not a devlayer frame and not the caller's caller."""
    import dataclasses

    from devlayer import comm

    with devlayer.init(backend="cpu"):
        world_two = dataclasses.replace(comm._ctx(), world=2, dist=_OneRankGroup())
        monkeypatch.setattr(comm, "_ctx", lambda: world_two)
        lines = _collectives_at_known_lines()
        tail = world_two.ledger.tail()
    assert [r["op"] for r in tail] == ["all_reduce", "all_reduce", "broadcast", "vote_any"]
    for (what, line), rec in zip(lines.items(), tail, strict=True):
        assert (what, rec["site"], rec["function"]) == (
            what,
            f"test_ledger.py:{line}",
            "_collectives_at_known_lines",
        )


def test_h22_p4_records_with_the_same_signature_keep_one_object() -> None:
    """H22-P4: a signature equal to the previous record's is kept as that same object (one
    object for a run of like calls, not one per record: fewer cold objects to free when the
    ring evicts), and each record still describes its own signature."""
    led = Ledger(size=8)
    first = led.begin("all_reduce", (tuple([4]), "torch.float32"))  # built at run time:
    second = led.begin("all_reduce", (tuple([4]), "torch.float32"))  # two equal objects
    other = led.begin("all_reduce", (tuple([2, 3]), "torch.int64"))
    assert second[DETAIL] is first[DETAIL]
    assert other[DETAIL] is not first[DETAIL]
    assert [r["detail"] for r in led.tail()] == ["[4] float32", "[4] float32", "[2, 3] int64"]
