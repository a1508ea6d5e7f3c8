"""The survivor watch's pure parts (issue 22, item 5): the decision after a poll, which exits
mark a rank failed, and the store protocol on an in-memory store (no process, no torch)."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from devlayer import peerwatch
from devlayer.peerwatch import (
    EVENT_KEY,
    GONE_AFTER,
    RELEASED_KEY,
    Decision,
    PeerWatch,
    Seen,
    decide,
    failure_of,
)

FAILED_0 = {"kind": "failed", "rank": 0, "reason": "all_reduce failed on rank 0 of 2"}
LEFT_0 = {"kind": "left", "rank": 0, "reason": ""}
GONE = (
    "the job's store is gone: rank 0, its host, exited or was killed without leaving "
    "normally (Broken pipe)"
)

#: seen, errors before, rank, failing -> decision (host: rank 0).
CASES = [
    (Seen(), 0, 1, False, Decision("watch")),
    (Seen(), 1, 1, False, Decision("watch")),  # an answer resets the count
    (Seen(FAILED_0), 0, 1, False, Decision("stop", "peer rank 0 failed: " + FAILED_0["reason"])),
    (Seen(FAILED_0), 0, 1, True, Decision("watch")),  # raising its own error
    (Seen(FAILED_0), 0, 0, False, Decision("watch")),  # its own failure
    (Seen(LEFT_0), 0, 1, False, Decision("release")),
    (Seen(LEFT_0), 0, 1, True, Decision("release")),
    (Seen(error="Broken pipe"), 0, 1, False, Decision("watch", errors=1)),  # one is not gone
    (Seen(error="Broken pipe"), 1, 1, False, Decision("stop", GONE, 2)),
    (Seen(error="Broken pipe"), 1, 1, True, Decision("watch", errors=2)),
    (Seen(error="Broken pipe"), 5, 0, False, Decision("watch")),  # the host holds the store
]


@pytest.mark.parametrize(("seen", "errors", "rank", "failing", "expected"), CASES)
def test_h22_s6_the_decision_after_a_poll(
    seen: Seen, errors: int, rank: int, failing: bool, expected: Decision
) -> None:
    """H22-S6: a peer's failure mark stops a rank (unless it is raising its own error or
    the mark is its own); "rank 0 left" releases it; the store counts as gone only after
    GONE_AFTER failed polls in a row (an answer in between resets the count), never at the
    host and never while this rank raises its own error."""
    assert GONE_AFTER == 2
    assert decide(seen, errors, rank=rank, host=0, failing=failing) == expected


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (None, None),
        (SystemExit(0), None),
        (SystemExit(None), None),
        (SystemExit(3), "SystemExit: 3"),
        (ValueError("bad batch\nmore"), "ValueError: bad batch"),
        (KeyboardInterrupt(), "KeyboardInterrupt"),
    ],
)
def test_h22_s6_which_exits_mark_a_rank_failed(exc: BaseException | None, expected: str) -> None:
    """H22-S6: an exception that ends a rank marks it failed with its type and first line;
    no exception and SystemExit with code 0 or None are a normal exit."""
    assert failure_of(type(exc) if exc is not None else None, exc) == expected


class FakeStore:
    """The part of torch's store the watch uses, in memory; clones share the keys."""

    def __init__(self, keys: dict[str, bytes] | None = None) -> None:
        self.keys = keys if keys is not None else {}
        self.requests = 0

    def clone(self) -> FakeStore:
        return FakeStore(self.keys)

    def set_timeout(self, timeout: Any) -> None:
        pass

    def check(self, names: list[str]) -> bool:
        self.requests += 1
        return all(n in self.keys for n in names)

    def get(self, name: str) -> bytes:
        self.requests += 1
        return self.keys[name]

    def add(self, name: str, n: int) -> int:
        value = int(self.keys.get(name, b"0")) + n
        self.keys[name] = str(value).encode()
        return value

    def compare_set(self, name: str, expected: str, desired: str) -> bytes:
        if name not in self.keys and expected == "":
            self.keys[name] = desired.encode()
        return self.keys.get(name, expected.encode())


def _watch(store: FakeStore, rank: int, world: int = 2, **kw: Any) -> PeerWatch:
    dump, say = kw.get("dump", lambda r: None), kw.get("say", print)
    return PeerWatch(store, rank, world, dump, say, busy=kw.get("busy", lambda: False))


def test_h22_s7_the_first_event_stays_and_the_host_leaves_once_released(monkeypatch) -> None:
    """H22-S7: a failure mark is kept when the host later says it left; a host that did
    not fail says "left" and waits until every other rank is released (each counts once,
    however often it leaves); with nobody to release it, it stops waiting after
    HOST_WAIT_S."""
    monkeypatch.setattr(peerwatch, "HOST_WAIT_S", 0.2)
    store = FakeStore()
    _watch(store, 1).mark_failed("it raised ValueError: x")
    _watch(store, 0).leave()  # rank 1 was not released: bounded wait
    assert json.loads(store.keys[EVENT_KEY])["kind"] == "failed"

    store = FakeStore()
    one, two = _watch(store, 1, 3), _watch(store, 2, 3)
    one.leave()
    one.leave()
    assert store.keys[RELEASED_KEY] == b"1"
    done = threading.Event()
    host = _watch(store, 0, 3)
    waiter = threading.Thread(target=lambda: (host.leave(), done.set()))
    monkeypatch.setattr(peerwatch, "HOST_WAIT_S", 120.0)
    waiter.start()
    assert not done.wait(0.5)  # rank 2 has not read "left" yet
    assert json.loads(store.keys[EVENT_KEY]) == {"kind": "left", "rank": 0, "reason": ""}
    two.leave()
    waiter.join(timeout=60)
    assert done.is_set() and store.keys[RELEASED_KEY] == b"2"


def test_h22_s7_a_host_that_failed_does_not_say_it_left(monkeypatch) -> None:
    """H22-S7: after mark_failed() the host's leave() posts no "left" (the failure stays
    the event) and still waits, bounded, for the others to read it."""
    monkeypatch.setattr(peerwatch, "HOST_WAIT_S", 0.2)
    store = FakeStore()
    host = _watch(store, 0)
    host.mark_failed("all_reduce failed on rank 0 of 2")
    host.leave()
    assert json.loads(store.keys[EVENT_KEY])["kind"] == "failed"


def _run_watch(
    monkeypatch, store: FakeStore, *, failing_in_grace: bool = False, busy: Any = None
) -> dict:
    """Run rank 1's watch thread against ``store`` with short periods; record what it
    does instead of signalling the test process."""
    monkeypatch.setattr(peerwatch, "POLL_S", 0.05)
    monkeypatch.setattr(peerwatch, "GRACE_S", 0.5)
    seen: dict[str, Any] = {"terminated": 0, "dumps": [], "said": [], "armed": []}
    monkeypatch.setattr(peerwatch, "_arm_hard_exit", seen["armed"].append)

    def terminate() -> None:
        seen["terminated"] += 1

    monkeypatch.setattr(peerwatch, "_terminate_self", terminate)
    watch = _watch(
        store, 1, dump=seen["dumps"].append, say=seen["said"].append, busy=busy or (lambda: False)
    )
    if failing_in_grace:

        def fail_soon() -> None:
            threading.Event().wait(0.15)
            watch.failing = True

        threading.Thread(target=fail_soon, daemon=True).start()
    watch.start()
    watch.thread.join(timeout=60)
    seen["released"] = store.keys.get(RELEASED_KEY)
    return seen


def test_h22_s8_the_watch_acts_on_a_peer_failure_after_its_grace(monkeypatch) -> None:
    """H22-S8: rank 1's watch reads rank 0's failure mark, counts itself released (so the
    failed host may leave), writes its dump with the reason, says one line naming rank 0,
    stops its own process (SIGTERM) and arms the hard exit."""
    store = FakeStore({EVENT_KEY: json.dumps(FAILED_0).encode()})
    seen = _run_watch(monkeypatch, store)
    reason = "peer rank 0 failed: all_reduce failed on rank 0 of 2"
    assert seen["dumps"] == [reason] and seen["terminated"] == 1
    assert seen["said"] and seen["said"][0].startswith(f"devlayer: rank 1: {reason}; ")
    assert seen["armed"] == [1] and seen["released"] == b"1"


def test_h22_s8_a_rank_that_raises_its_own_error_in_the_grace_is_left_alone(
    monkeypatch,
) -> None:
    """H22-S8: a rank that starts raising its own error during the grace is not stopped:
    no dump from the watch, no SIGTERM."""
    store = FakeStore({EVENT_KEY: json.dumps(FAILED_0).encode()})
    seen = _run_watch(monkeypatch, store, failing_in_grace=True)
    assert seen["dumps"] == [] and seen["terminated"] == 0 and seen["armed"] == [], seen


def test_h22_s8_a_rank_waiting_in_a_collective_is_stopped_only_once_it_is_not(
    monkeypatch,
) -> None:
    """H22-S8: while this rank waits in a collective (which ends by its own timeout, with
    its own report) the watch does not stop it; once the rank is back in its own code,
    the watch stops it."""
    store = FakeStore({EVENT_KEY: json.dumps(FAILED_0).encode()})
    asked: list[int] = []

    def busy() -> bool:
        asked.append(1)
        return len(asked) < 30  # in a collective for the first 30 questions

    seen = _run_watch(monkeypatch, store, busy=busy)
    assert len(asked) >= 30 and seen["terminated"] == 1, (len(asked), seen)
    assert seen["dumps"] == ["peer rank 0 failed: all_reduce failed on rank 0 of 2"]


def test_h22_s8_the_watch_reads_left_and_ends_quietly(monkeypatch) -> None:
    """H22-S8: "rank 0 left" ends the watch: released, no dump, no signal."""
    store = FakeStore({EVENT_KEY: json.dumps(LEFT_0).encode()})
    seen = _run_watch(monkeypatch, store)
    assert seen["dumps"] == [] and seen["terminated"] == 0 and seen["released"] == b"1"


def test_h22_s9_a_stop_ends_within_the_timeout_plus_30_seconds() -> None:
    """H22-S9: the failed rank marks the job after its report's gathering grace (at most
    10 s past its timeout); a survivor then sees the mark (or the gone store) within
    GONE_AFTER polls, waits GRACE_S and exits hard at the latest HARD_EXIT_AFTER_S after
    its SIGTERM: at most 30 s past the timeout."""
    gathering = 10.0  # hangdump.on_collective_error: min(10, max(1, timeout / 4))
    worst = gathering + GONE_AFTER * peerwatch.POLL_S + peerwatch.GRACE_S
    assert worst + peerwatch.HARD_EXIT_AFTER_S <= 30.0


def test_h22_s8_busy_means_a_collective_its_timeout_will_still_end(tmp_path) -> None:
    """H22-S8: the watch counts this rank as busy while its newest ledger record is a
    collective running for less than the timeout plus the report's gathering (10 s); a
    completed one, or one running past that (a stale record, a call that never times out),
    does not keep the watch away."""
    from devlayer import hangdump
    from devlayer.ledger import START, Ledger, new_ledger

    setup = hangdump.HangSetup(tmp_path, {"rank": 1, "world_size": 2}, 5.0, 0.0)
    led = new_ledger()
    assert not hangdump._in_collective(setup)  # no collective yet
    rec = led.begin("all_reduce")
    assert hangdump._in_collective(setup)
    rec[START] -= 5.0 + 10.0 + 1.0
    assert not hangdump._in_collective(setup)
    Ledger.done(led.begin("barrier"))
    assert not hangdump._in_collective(setup)
