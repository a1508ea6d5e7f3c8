"""Real two-rank gloo runs started with devlayer.spawn."""

from __future__ import annotations

import pytest

import devlayer
from tests.dist.worker_collectives import check

pytestmark = [pytest.mark.dist, pytest.mark.timeout(240)]


def test_all_collectives_on_two_spawned_ranks(clean_env):
    results = devlayer.spawn(check, nprocs=2, backend="cpu", timeout=30, join_timeout=150)
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["world_size"] == 2 and r["comm"] == "gloo" for r in results)
    assert all(r["launcher"] == "env" for r in results)


def _rank_zero_finishes_last() -> dict[str, int]:
    """Rank 0 returns only once rank 1's process is gone (its result already queued)."""
    import os
    import time

    pids = devlayer.all_gather_object(os.getpid())
    if devlayer.rank() == 0:
        deadline = time.monotonic() + 60
        while True:  # spawn reaps rank 1 once it exits; then its pid no longer exists
            try:
                os.kill(pids[1], 0)
            except ProcessLookupError:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank 1 (pid {pids[1]}) did not exit within 60 s")
            time.sleep(0.05)
    return {"rank": devlayer.rank(), "pid": os.getpid()}


def test_spawn_returns_results_in_rank_order_not_completion_order(clean_env):
    # Deterministic, not timing-based: rank 1 always completes first here.
    results = devlayer.spawn(
        _rank_zero_finishes_last, nprocs=2, backend="cpu", timeout=30, join_timeout=150
    )
    assert [r["rank"] for r in results] == [0, 1], results


def _raise_on_rank_one() -> None:
    if devlayer.rank() == 1:
        raise ValueError("boom on rank one")
    devlayer.barrier(timeout=20)


def test_spawn_reports_the_failing_rank_with_its_traceback(clean_env):
    with pytest.raises(devlayer.RankFailedError) as info:
        devlayer.spawn(_raise_on_rank_one, nprocs=2, backend="cpu", timeout=20, join_timeout=60)
    assert info.value.rank == 1
    assert "ValueError: boom on rank one" in str(info.value)
    assert "_raise_on_rank_one" in info.value.remote_traceback


def _sleep_forever() -> None:
    import time

    time.sleep(600)


def test_spawn_join_timeout_stops_stuck_ranks(clean_env):
    with pytest.raises(devlayer.RankFailedError, match="still running"):
        devlayer.spawn(_sleep_forever, nprocs=2, backend="cpu", join_timeout=8)


def _world_one() -> tuple[int, int]:
    return devlayer.rank(), devlayer.world_size()


def test_spawn_one_process(clean_env):
    assert devlayer.spawn(_world_one, nprocs=1, backend="cpu", join_timeout=60) == [(0, 1)]


def test_spawn_rejects_bad_nprocs():
    with pytest.raises(devlayer.errors.InvalidArgumentError, match="nprocs=0"):
        devlayer.spawn(_world_one, nprocs=0)
