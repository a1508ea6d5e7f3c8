"""The Trainer on real gloo ranks: convergence, identical replicas, accumulation, resume."""

from __future__ import annotations

import json

import pytest
import torch

import devlayer
from tests.dist.trainer_worker import train, train_then_resume

pytestmark = [pytest.mark.dist, pytest.mark.timeout(240)]


def _spawn(fn, *args, **kwargs):
    from functools import partial

    return devlayer.spawn(
        partial(fn, *args, **kwargs), nprocs=2, backend="cpu", timeout=60, join_timeout=200
    )


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_ranks_converge_and_stay_identical(clean_env, tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    r0, r1 = _spawn(train, max_epochs=6, metrics_file=str(metrics))
    assert _same(r0["weights"], r1["weights"]), "DDP replicas diverged"
    first, last = r0["history"][0], r0["history"][-1]
    assert last["train_loss"] < first["train_loss"] / 4
    assert last["val_loss"] < first["val_loss"] / 4
    assert r0["history"] == r1["history"], "every rank must report the same averaged metrics"
    assert [h["world_size"] for h in r0["history"]] == [2] * 6
    lines = metrics.read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert all(r["initialized_after_fit"] for r in (r0, r1))


def test_grad_accum_matches_the_same_global_batch(clean_env):
    plain, _ = _spawn(train, max_epochs=2, batch_size=16, grad_accum=1, val=False)
    accum, _ = _spawn(train, max_epochs=2, batch_size=16, grad_accum=2, val=False)
    for key in plain["weights"]:
        torch.testing.assert_close(
            accum["weights"][key], plain["weights"][key], rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("stop_after", [5, 6], ids=["mid-epoch", "epoch-boundary"])
def test_resume_is_bitwise_identical_to_an_uninterrupted_run(clean_env, tmp_path, stop_after):
    # 96 samples / global batch 16 = 6 steps per epoch: step 5 is mid-epoch, 6 a boundary.
    straight, _ = _spawn(train, max_epochs=3)
    resumed, other = _spawn(train_then_resume, str(tmp_path / "ckpt"), stop_after, max_epochs=3)
    assert resumed["resumed_from"] is not None
    assert _same(resumed["weights"], straight["weights"])
    assert _same(other["weights"], straight["weights"])
    assert [h["train_loss"] for h in resumed["history"]] == [
        h["train_loss"] for h in straight["history"]
    ]


def test_world_size_one_same_code(clean_env, tmp_path):
    with devlayer.init(backend="cpu"):
        result = train(max_epochs=2, metrics_file=str(tmp_path / "m.jsonl"))
    assert result["history"][-1]["world_size"] == 1
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 2


def test_f8_failed_checkpoint_write_fails_every_rank_alike(clean_env, tmp_path):
    """Rank 0's second checkpoint write hits ENOSPC: both ranks raise the same CheckpointError
    naming rank 0 and the full disk, the previous checkpoint stays newest and verifies, and no
    temp folder is left behind."""
    from devlayer.train.checkpoint import CheckpointStore
    from tests.dist.trainer_worker import train_with_failing_second_save

    ckpt = tmp_path / "ckpt"
    errors = _spawn(train_with_failing_second_save, str(ckpt))
    assert errors[0] == errors[1] != "no error"
    assert errors[0].startswith("CheckpointError: rank 0 could not save the checkpoint")
    assert "No space left on device" in errors[0]
    store = CheckpointStore(ckpt)
    assert [p.name for p in store.list()] == ["step-000000002"]  # the previous one survives
    store.verify(store.list()[0])
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".tmp-")]


def test_d1_two_identical_runs_are_bitwise_identical(clean_env):
    """Two 2-rank runs with the same seed end with bitwise-identical weights; any unseeded
    randomness in model init, data order or training would make them differ."""
    first, _ = _spawn(train, max_epochs=2)
    second, _ = _spawn(train, max_epochs=2)
    assert _same(first["weights"], second["weights"])


def test_d2_per_rank_seeds_and_c8_single_writer(clean_env, tmp_path):
    """After seeding, ranks draw different random numbers, data shards and loader worker seeds,
    and a rerun draws the same (D2); only rank 0 calls CheckpointStore.save (C8, one writer)."""
    from tests.dist.trainer_worker import seeds_and_writers

    r0, r1 = _spawn(seeds_and_writers, str(tmp_path / "a"))
    again, _ = _spawn(seeds_and_writers, str(tmp_path / "b"))
    assert r0["draw"] != r1["draw"], "ranks must draw different random numbers"
    assert again["draw"] == r0["draw"], "a rerun with the same seed draws the same"
    assert r0["first"] != r1["first"], "each rank gets its own shard"
    assert r0["worker_base_seed"] != r1["worker_base_seed"], "worker seeds depend on the rank"
    assert r0["writers"] and set(r0["writers"]) == {0} and r1["writers"] == []


def test_c3_world_size_change_refused_unless_allowed(clean_env, tmp_path):
    """A 2-rank checkpoint is refused at world size 1 with CheckpointWorldSizeError naming both
    sizes; with allow_world_size_change=True the Trainer resumes it on one rank and continues
    the interrupted epoch at its exact sample (issue 23; tests/dist/test_elastic.py)."""
    from devlayer.train.checkpoint import CheckpointStore, CheckpointWorldSizeError

    ckpt = tmp_path / "ckpt"
    _spawn(train, max_epochs=1, checkpoint_dir=str(ckpt), checkpoint_every=2, max_steps=5)
    saved, manifest = CheckpointStore(ckpt).load()
    assert manifest["world_size"] == 2
    with devlayer.init(backend="cpu"):
        with pytest.raises(CheckpointWorldSizeError, match=r"2.*1|1.*2"):
            train(max_epochs=1, checkpoint_dir=str(ckpt))
        result = train(max_epochs=2, checkpoint_dir=str(ckpt), allow_world_size_change=True)
    # Weights and optimizer continued from the 2-rank checkpoint at step 5 of 6; the
    # interrupted epoch went on at its exact sample: 1 step to its end, then 6 more.
    assert result["resumed_from"] is not None
    assert result["history"][-1]["world_size"] == 1
    assert result["history"][-1]["global_step"] == saved["global_step"] + 1 + 6


@pytest.mark.parametrize("check_every", [1, 2])
def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step(clean_env, tmp_path, check_every):
    from devlayer.train.checkpoint import CheckpointStore
    from tests.dist.trainer_worker import preempt_one_rank

    r0, r1 = _spawn(preempt_one_rank, str(tmp_path), check_every)
    assert r0["step"] == r1["step"], (r0, r1)
    # The signal lands after step 3; the flag goes out at the next check and is read at
    # the check after it (18 steps in all, so stopping early is visible).
    assert 3 < r0["step"] <= 3 + 2 * check_every
    for r in (r0, r1):
        assert r["error"] is not None and "received signal SIGTERM" in r["error"]
    newest = CheckpointStore(tmp_path).latest()
    assert newest is not None and int(newest.name.split("-")[1]) == r0["step"]


def test_fsdp_sigterm_on_one_rank_stops_every_rank_at_the_same_step_with_shards(
    clean_env, tmp_path
):
    """strategy="fsdp": the agreed stop and its checkpoint work as under DDP, the checkpoint
    is sharded (every rank wrote its shard), and a new run resumes from it."""
    from devlayer.train.checkpoint import CheckpointStore
    from tests.dist.trainer_worker import preempt_one_rank

    r0, r1 = _spawn(preempt_one_rank, str(tmp_path), 2, "fsdp")
    assert r0["step"] == r1["step"] and 3 < r0["step"] <= 7, (r0, r1)
    assert all("received signal SIGTERM" in (r["error"] or "") for r in (r0, r1))
    newest = CheckpointStore(tmp_path).latest()
    assert newest is not None and int(newest.name.split("-")[1]) == r0["step"]
    assert sorted(p.name for p in (newest / "shards").glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]
