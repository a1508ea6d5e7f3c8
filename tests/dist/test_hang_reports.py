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


@pytest.mark.timeout(300)
def test_h22_15_four_ranks_one_stuck_each_waiting_rank_names_it(clean_env, tmp_path) -> None:
    """H22-15: 4 spawned ranks, rank 2 loops in user code: the error of a waiting rank
    names rank 2, stuck_in_user_code and the collective it has not entered, and no other
    rank as missing."""
    from tests.dist.hang_worker import stuck_rank_two_of_four

    with pytest.raises(devlayer.RankFailedError) as info:
        devlayer.spawn(
            stuck_rank_two_of_four,
            nprocs=4,
            backend="cpu",
            timeout=10,
            join_timeout=200,
            env={"DEVLAYER_WATCHDOG": "3", "DEVLAYER_HANG_DIR": str(tmp_path)},
        )
    text = str(info.value)
    assert "rank 2 has not entered all_reduce #1; it is in stuck_in_user_code at " in text, text
    assert "left no report" not in text, text


@pytest.mark.timeout(240)
def test_h22_16_a_rank_killed_with_sigkill_is_named_as_gone(tmp_path) -> None:
    """H22-16: two plain processes (hand-set RANK/WORLD_SIZE, rank 0 hosts the store);
    rank 1 dies of SIGKILL (no handler can run) while rank 0 waits in all_reduce: rank 0's
    error names rank 1 as the rank that left no report."""
    from tests.dist.ranks import finish, start_ranks
    from tests.helpers import ROOT

    procs = start_ranks([str(ROOT / "tests" / "dist" / "hang_job.py"), "kill", str(tmp_path)])
    outs = [(out, err) for _, out, err in finish(procs, timeout=150)]
    assert procs[1].returncode == -9 and procs[0].returncode != 0
    err = outs[0][1]
    assert "all_reduce failed on rank 0 of 2" in err, err[-3000:]
    assert "rank(s) 1 left no report (no dump, no answer): exited or killed" in err, err[-3000:]


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("fn", "expected"),
    [
        ("rank_one_returns_early", "rank(s) 1 left no report (no dump, no answer)"),
        ("barrier_against_all_reduce", "ranks called different collectives at #1: rank 0 barrier"),
    ],
)
def test_h22_18_spawn_early_exit_and_different_collectives_are_named(
    clean_env, tmp_path, fn: str, expected: str
) -> None:
    """H22-18: under devlayer.spawn, a rank that returns (exit code 0) before a collective
    is named as gone, and a barrier against an all_reduce is named with both calls."""
    from tests.dist import hang_worker

    with pytest.raises(devlayer.RankFailedError) as info:
        devlayer.spawn(
            getattr(hang_worker, fn),
            nprocs=2,
            backend="cpu",
            timeout=8,
            join_timeout=120,
            env={"DEVLAYER_HANG_DIR": str(tmp_path)},
        )
    assert expected in str(info.value), str(info.value)


@pytest.mark.timeout(240)
def test_h22_19_a_hang_inside_the_trainer_step_is_found_in_the_dumps(clean_env, tmp_path) -> None:
    """H22-19: rank 1 hangs inside the Trainer's training_step at its 4th step while rank 0
    waits in DDP's gradient all_reduce (not a devlayer collective, so its error is torch's):
    the watchdog and SIGTERM dumps in the folder give a verdict naming rank 1 in
    stuck_in_user_code, and rank 0 in DDP's 4th bucket all_reduce (recorded since H22-H5),
    and rank 1's dump carries the Trainer's step (3 steps done)."""
    from devlayer.hangreport import read_dumps, verdict
    from tests.dist.hang_worker import trainer_stuck_in_step

    with pytest.raises(devlayer.RankFailedError):
        devlayer.spawn(
            trainer_stuck_in_step,
            nprocs=2,
            backend="cpu",
            timeout=8,
            join_timeout=150,
            env={"DEVLAYER_WATCHDOG": "3", "DEVLAYER_HANG_DIR": str(tmp_path)},
        )
    reports, _ = read_dumps(tmp_path)
    assert 1 in reports, sorted(tmp_path.iterdir())
    assert reports[1]["step"] == 3, reports[1]["step"]
    text = verdict(reports, 2)
    # The Trainer made no devlayer collective in 3 steps; DDP's bucket all_reduce is in the
    # ledger (H22-H5): one per step, so rank 0 waits in the 4th (#3).
    assert "rank 1 has not entered ddp all_reduce #3; it is in stuck_in_user_code at " in text
    assert "hang_worker.py:" in text.split("stuck_in_user_code at ")[1], text
    assert "rank 0 wait" in text and " in ddp all_reduce #3 bucket 0 [5] float32 at " in text
