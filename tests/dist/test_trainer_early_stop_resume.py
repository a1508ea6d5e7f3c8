"""Early stopping across resumes on real gloo ranks (issue 20: resume).

The worker's regression (96 samples, global batch 16: 6 steps per epoch) gives these
validation losses per epoch: 0.598, 0.549, 0.165, 0.137, 0.068, 0.035, 0.032, 0.041, 0.021.
With ``patience=2, min_delta=0.04`` epochs 4, 6 and 7 bring no improvement of 0.04 over the
best, so an uninterrupted run stops after epoch 7 (step 42). Resumed inside epoch 6 without
the best value (0.068) and the patience counter, it would stop after epoch 8 or 9 instead.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import torch

import devlayer
from tests.dist.trainer_worker import train, train_then_resume

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]

STOP = {"monitor": "val_loss", "patience": 2, "min_delta": 0.04}


def _spawn(fn, *args, **kwargs):
    return devlayer.spawn(
        partial(fn, *args, **kwargs), nprocs=2, backend="cpu", timeout=60, join_timeout=250
    )


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _untimed(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in h.items() if k not in ("epoch_time", "samples_per_sec")} for h in history
    ]


def test_r5_r1_a_run_early_stopping_ended_trains_nothing_when_resubmitted(clean_env, tmp_path):
    """R5-R1: resubmitting a run that early stopping ended does no step (it trained one more
    epoch per resubmission): every rank reports the same stop, weights and history, and the
    summary line says early stopping ended it and where it resumed from."""
    ckpt = str(tmp_path / "ckpt")
    first, _ = _spawn(train, max_epochs=12, checkpoint_dir=ckpt, early_stopping=STOP)
    assert first["stop_reason"] == "early_stopping" and first["global_step"] == 42
    again, other = _spawn(
        train, max_epochs=12, checkpoint_dir=ckpt, early_stopping=STOP, progress=True
    )
    for run in (again, other):
        assert run["resumed_from"] is not None
        assert run["global_step"] == 42
        assert run["stop_reason"] == "early_stopping" and run["stopped_early"]
        assert _same(run["weights"], first["weights"])
        assert run["history"] == first["history"]
    assert again["history"][-1]["stopped_by"] == "early_stopping"
    (summary,) = [line for line in again["stdout"].splitlines() if line.startswith("stopped")]
    assert summary.startswith(
        "stopped: early stopping on val_loss at step 42, epoch 7; max_epochs=12 not reached "
        "(resumed from "
    ), summary
    assert "| train_loss" not in again["stdout"], "no epoch may run"


def test_r5_r2_a_run_resumed_mid_run_stops_at_the_same_epoch(clean_env, tmp_path):
    """R5-R2: EarlyStopping's best value and patience counter survive a resume inside an
    epoch: the resumed run stops after the same epoch, at the same step, with bitwise the
    same weights and the same history as an uninterrupted run."""
    straight, _ = _spawn(train, max_epochs=12, early_stopping=STOP)
    assert straight["stop_reason"] == "early_stopping"
    assert [h["epoch"] for h in straight["history"]] == [1, 2, 3, 4, 5, 6, 7]
    # The first run stops at step 33 (inside epoch 6, after epoch 5's new best); the second
    # resumes there.
    resumed, other = _spawn(
        train_then_resume, str(tmp_path / "ckpt"), 33, max_epochs=12, early_stopping=STOP
    )
    assert resumed["resumed_from"] is not None
    for run in (resumed, other):
        assert run["stop_reason"] == "early_stopping"
        assert run["global_step"] == straight["global_step"] == 42
        assert _same(run["weights"], straight["weights"])
    assert _untimed(resumed["history"]) == _untimed(straight["history"])
