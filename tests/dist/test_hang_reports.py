"""Hang reports on real gloo ranks (issue 22): the ledger, dumps, the verdict."""

from __future__ import annotations

import pytest

import devlayer
from tests.dist.hang_worker import count_with_and_without_ledger

pytestmark = [pytest.mark.dist]


@pytest.mark.timeout(240)
def test_h22_2_the_ledger_records_every_collective_and_adds_none(clean_env) -> None:
    """H22-2: on 2 spawned gloo ranks every devlayer collective (tensor, container, gather,
    broadcast, barrier, object collectives, vote) is recorded with the user's call site,
    and the torch.distributed calls are the same with the ledger as with its recording
    stubbed out: the ledger adds no collective."""
    results = devlayer.spawn(
        count_with_and_without_ledger, nprocs=2, backend="cpu", timeout=60, join_timeout=180
    )
    for r in results:
        assert r["with"] == r["without"] and sum(r["with"].values()) >= 8, r
        ops = [rec["op"] for rec in r["records"]]
        assert ops == [
            "all_reduce",
            "all_reduce",
            "all_gather",
            "broadcast",
            "barrier",
            "all_gather_object",
            "broadcast_object",
            "vote_any",
        ]
        assert [rec["seq"] for rec in r["records"]] == list(range(8))
        assert all(rec["state"] == "done" for rec in r["records"])
        assert {rec["site"].split(":")[0] for rec in r["records"]} == {"hang_worker.py"}
        assert r["records"][0]["detail"] == "[4] float32"


@pytest.mark.timeout(240)
def test_h22_7_spawn_a_rank_stuck_in_user_code_is_named(clean_env, tmp_path) -> None:
    """H22-7: under devlayer.spawn (timeout 8 s, watchdog 3 s) rank 1 loops in user code
    while rank 0 waits in all_reduce: the RankFailedError carries rank 0's CollectiveError,
    which names rank 1, the collective it has not entered and its function and line."""
    from tests.dist.hang_worker import stuck_rank_one

    with pytest.raises(devlayer.RankFailedError) as info:
        devlayer.spawn(
            stuck_rank_one,
            nprocs=2,
            backend="cpu",
            timeout=8,
            join_timeout=120,
            env={"DEVLAYER_WATCHDOG": "3", "DEVLAYER_HANG_DIR": str(tmp_path)},
        )
    text = str(info.value)
    assert "rank 1 has not entered all_reduce #1; it is in stuck_in_user_code at " in text, text
    assert "hang_worker.py:" in text.split("stuck_in_user_code at ")[1]


@pytest.mark.timeout(240)
def test_h22_8_the_watchdog_dumps_once_quiet_and_stops_at_shutdown(clean_env, tmp_path) -> None:
    """H22-8: with DEVLAYER_WATCHDOG=1 a rank that completed no collective for 1 s writes a
    watchdog dump; SIGTERM inside the Trainer's preemption block (train.signals.on_sigterm)
    still writes the dump and calls the Trainer's handler; shutdown() ends the watchdog
    thread."""
    from tests.dist.hang_worker import watchdog_round

    results = devlayer.spawn(
        watchdog_round,
        nprocs=2,
        backend="cpu",
        timeout=60,
        join_timeout=180,
        env={"DEVLAYER_WATCHDOG": "1", "DEVLAYER_HANG_DIR": str(tmp_path)},
    )
    for r in results:
        assert r["watchdog"].startswith("watchdog: no collective completed for 1s"), r
        assert r["term"] == "signal SIGTERM" and r["caught"] == [15], r
        assert r["alive"] == [], r
