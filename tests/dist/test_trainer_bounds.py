"""max_steps / max_epochs on real gloo ranks (issue 13 item 2).

96 training samples with a global batch of 16 make 6 optimizer steps per epoch.
"""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch

import devlayer
from tests.dist.trainer_worker import full_set_loss, make_data, train

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]

VAL = make_data(48, seed=1)


def _spawn(fn, *args, **kwargs):
    return devlayer.spawn(
        partial(fn, *args, **kwargs), nprocs=2, backend="cpu", timeout=60, join_timeout=250
    )


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _summary(out: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith("stopped")]
    assert len(lines) == 1, out
    return lines[0]


def test_max_steps_alone_runs_across_epochs(clean_env, tmp_path):
    from devlayer.train.checkpoint import CheckpointStore

    metrics = tmp_path / "metrics.jsonl"
    ckpt = tmp_path / "ckpt"
    r0, r1 = _spawn(
        train,
        max_epochs=None,
        max_steps=15,
        metrics_file=str(metrics),
        checkpoint_dir=str(ckpt),
        progress=True,
    )
    assert r0["global_step"] == r1["global_step"] == 15
    assert _same(r0["weights"], r1["weights"])
    history = r0["history"]
    assert history == r1["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert [h["global_step"] for h in history] == [6, 12, 15]
    assert [h.get("partial", False) for h in history] == [False, False, True]
    assert history[-1]["batches"] == 3 and history[-1]["batches_per_epoch"] == 6
    assert history[-1]["stopped_by"] == "max_steps" and r0["stop_reason"] == "max_steps"
    assert all("stopped_by" not in h for h in history[:-1])
    # The partial epoch was validated with the final weights, over the whole set.
    assert history[-1]["val_loss"] == pytest.approx(full_set_loss(r0["weights"], VAL), rel=1e-6)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert rows == history
    # The final checkpoint is the stop position: epoch 3 (0-based 2), 3 batches into it.
    payload, manifest = CheckpointStore(ckpt).load()
    assert manifest["step"] == 15
    assert (payload["epoch"], payload["batches_done"], payload["global_step"]) == (2, 3, 15)
    assert payload["history"][-1]["stopped_by"] == "max_steps"
    assert _summary(r0["stdout"]) == (
        "stopped: max_steps=15 reached at step 15, epoch 3 after 3/6 batches"
    )
    assert "epoch 3 (partial: 3/6 batches) | train_loss" in r0["stdout"]
    assert r1["stdout"] == "", "only rank 0 prints"


def test_max_steps_within_one_epoch_still_validates_and_records(clean_env, tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    r0, _ = _spawn(train, max_epochs=None, max_steps=4, metrics_file=str(metrics))
    assert r0["global_step"] == 4
    (only,) = r0["history"]
    assert only["partial"] and only["epoch"] == 1 and only["global_step"] == 4
    assert only["batches"] == 4 and only["stopped_by"] == "max_steps"
    assert only["val_loss"] == pytest.approx(full_set_loss(r0["weights"], VAL), rel=1e-6)
    assert only["train_loss"] > 0
    assert [json.loads(line) for line in metrics.read_text().splitlines()] == [only]


@pytest.mark.parametrize(
    ("bounds", "step", "epochs", "summary"),
    [
        (
            {"max_epochs": 2, "max_steps": 100},
            12,
            [1, 2],
            "stopped: max_epochs=2 reached at step 12, epoch 2; max_steps=100 not reached",
        ),
        (
            {"max_epochs": 5, "max_steps": 8},
            8,
            [1, 2],
            "stopped: max_steps=8 reached at step 8, epoch 2 after 2/6 batches; "
            "max_epochs=5 not reached",
        ),
        (
            {"max_epochs": 2, "max_steps": 12},
            12,
            [1, 2],
            "stopped: max_steps=12 reached at step 12, epoch 2; max_epochs=2 reached too",
        ),
    ],
    ids=["epochs-first", "steps-first", "both-at-once"],
)
def test_both_bounds_the_first_reached_wins(clean_env, bounds, step, epochs, summary):
    r0, r1 = _spawn(train, progress=True, **bounds)
    assert r0["global_step"] == r1["global_step"] == step
    assert [h["epoch"] for h in r0["history"]] == epochs
    winner = summary.split()[1].split("=")[0]
    assert r0["stop_reason"] == r1["stop_reason"] == r0["history"][-1]["stopped_by"] == winner
    assert _summary(r0["stdout"]) == summary


def test_resume_from_a_max_steps_stop_matches_an_uninterrupted_run(clean_env, tmp_path):
    from tests.dist.trainer_worker import train_then_resume

    straight, _ = _spawn(train, max_epochs=None, max_steps=10)
    # The first run stops at step 4 (mid-epoch 1, validated and recorded as partial); the
    # second resumes there with max_steps=10 and stops mid-epoch 2 like the straight run.
    resumed, other = _spawn(
        train_then_resume, str(tmp_path / "ckpt"), 4, max_epochs=None, final_max_steps=10
    )
    assert resumed["resumed_from"] is not None
    assert resumed["global_step"] == straight["global_step"] == 10
    assert _same(resumed["weights"], straight["weights"])
    assert _same(other["weights"], straight["weights"])

    def comparable(history):
        return [
            {k: v for k, v in h.items() if k not in ("epoch_time", "samples_per_sec")}
            for h in history
        ]

    assert comparable(resumed["history"]) == comparable(straight["history"])
    assert [h.get("partial", False) for h in resumed["history"]] == [False, True]


def test_neither_bound_means_one_epoch(clean_env):
    r0, _ = _spawn(train, max_epochs=None, max_steps=None, progress=True)
    assert r0["global_step"] == 6 and [h["epoch"] for h in r0["history"]] == [1]
    assert _summary(r0["stdout"]) == "stopped: max_epochs=1 reached at step 6, epoch 1"


def test_resumed_run_already_past_max_steps_trains_nothing(clean_env, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    first, _ = _spawn(train, max_epochs=None, max_steps=3, checkpoint_dir=ckpt)
    again, _ = _spawn(train, max_epochs=None, max_steps=3, checkpoint_dir=ckpt, progress=True)
    assert _same(first["weights"], again["weights"])
    assert again["history"] == first["history"] and again["global_step"] == 3
    assert _summary(again["stdout"]).startswith(
        "stopped: max_steps=3 reached at step 3, epoch 1 after 3/6 batches (resumed from "
    )
