"""Asynchronous checkpoints (issue 24) on real gloo ranks: bitwise resume, the in-flight
rule, a full disk in the background, the lock and the error path."""

from __future__ import annotations

from functools import partial

import pytest
import torch

import devlayer
from devlayer.train.checkpoint import CheckpointStore
from tests.dist.async_worker import failing_background_saves, held_writer, straight_then_async

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]


def _spawn(fn, *args, **kwargs):
    return devlayer.spawn(
        partial(fn, *args, **kwargs), nprocs=2, backend="cpu", timeout=60, join_timeout=250
    )


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_c24_1_background_saves_resume_bitwise(clean_env, tmp_path, strategy):
    """C24-1: 2 ranks save every 2 steps in the background and stop at step 5 (mid-epoch);
    step 4's background write is held until step 5 has changed the weights, and the run's
    last (synchronous) checkpoint is removed, so the resume starts from step 4's background
    checkpoint. The resumed run (to the end of epoch 2) ends bitwise equal to a run without
    checkpoints, on both ranks; no .tmp- entry is left after either clean end and every
    checkpoint verifies. Both runs share one spawn of the ranks."""
    ckpt = tmp_path / "ckpt"
    r0, r1 = _spawn(straight_then_async, str(ckpt), strategy, 5)
    assert r0["first_steps"] == 5 and r0["resumed_from"].endswith("step-000000004")
    assert _same(r0["straight"], r1["straight"])
    for r in (r0, r1):
        assert _same(r["weights"], r["straight"]), f"rank {r['rank']} differs"
    assert r0["leftovers"] == []
    store = CheckpointStore(ckpt)
    assert [p.name for p in store.list()][-1] == "step-000000012"
    for path in store.list():
        store.verify(path)


def test_c24_2_full_disk_in_the_background_fails_every_rank_naming_enospc(clean_env, tmp_path):
    """C24-2: rank 0's second background write hits ENOSPC, under DDP and under FSDP (one
    spawn of the ranks, one run each): at the next step boundary both ranks raise the same
    CheckpointError naming ENOSPC and the step, the first checkpoint stays newest and
    verifies, and no temp folder is left."""
    strategies = ("ddp", "fsdp")
    r0, r1 = _spawn(failing_background_saves, str(tmp_path), strategies)
    assert r0 == r1, (r0, r1)
    for strategy in strategies:
        error, step = r0[strategy]["error"], r0[strategy]["step"]
        assert error.startswith("CheckpointError: the background save of checkpoint step 4")
        assert "ENOSPC" in error and "previous checkpoint stands" in error, strategy
        assert step < 18, strategy  # reported during training, not at the end
        ckpt = tmp_path / strategy
        store = CheckpointStore(ckpt)
        assert [p.name for p in store.list()] == ["step-000000002"], strategy
        store.verify(store.list()[0])
        assert not [p for p in ckpt.iterdir() if p.name.startswith(".tmp-")], strategy


def test_c24_3_next_trigger_waits_for_the_save_in_flight_and_says_so(clean_env, tmp_path):
    """C24-3: the rule for a trigger while a save is in flight is "wait": step 2's background
    write is held before its rename until the Trainer logs that it waits for it (so no
    timing is involved); step 4's save starts only after step 2 committed, nothing is
    skipped, and the folder lock is held while the writer runs."""
    with devlayer.init(backend="cpu"):
        out = held_writer(str(tmp_path / "ckpt"))
    waits = [m for m in out["log"] if "waiting for it" in m]
    assert waits and "checkpoint step 2" in waits[0] and "saving step 4" in waits[0], out["log"]
    assert out["commits"] == [
        "tmp-step-000000002",
        "tmp-step-000000004",
        "tmp-step-000000006",
    ]
    assert out["lock_seen"] == ["in use"]
    assert out["free_after"] == "free"
    assert out["steps"] == ["step-000000004", "step-000000006"]  # keep=2


def test_c24_4_an_exception_waits_for_the_save_in_flight_before_the_lock_goes(clean_env, tmp_path):
    """C24-4: training_step raises while step 2's save is in flight: fit() waits for the
    writer (held until fit logs that it waits) before releasing the folder lock, so step 2
    is committed, the user's error propagates and the folder is free afterwards."""
    with devlayer.init(backend="cpu"):
        out = held_writer(str(tmp_path / "ckpt"), fail_at=2)
    assert out["error"] == "ValueError: user bug at step 3"
    assert any("before releasing" in m for m in out["log"]), out["log"]
    assert out["steps"] == ["step-000000002"]
    assert out["lock_seen"] == ["in use"] and out["free_after"] == "free"
    CheckpointStore(tmp_path / "ckpt").verify(tmp_path / "ckpt" / "step-000000002")


def test_c24_7_preemption_waits_for_the_save_in_flight_then_saves_synchronously(
    clean_env, tmp_path
):
    """C24-7: SIGTERM arrives while step 2's background save is in flight (held before its
    rename until the Trainer logs that it waits): the preemption save of step 3 waits for
    it, then is written synchronously, so fit() raises PreemptedError with both step 2 and
    step 3 committed, in that order."""
    with devlayer.init(backend="cpu"):
        out = held_writer(str(tmp_path / "ckpt"), term_at=2)
    assert out["error"].startswith("PreemptedError"), out["error"]
    waits = [m for m in out["log"] if "waiting for it" in m]
    assert waits and "checkpoint step 2" in waits[0] and "saving step 3" in waits[0], out["log"]
    assert out["commits"] == ["tmp-step-000000002", "tmp-step-000000003"]
    assert out["steps"] == ["step-000000002", "step-000000003"]
    assert out["free_after"] == "free"
