"""Trainer guarantees that one-line breakages slipped past (issue 13), on real gloo ranks.

Each test was checked against the breakage it names (see docs/reliability.md, round 3
training rows): it fails with the library broken that way and passes without.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

import devlayer
from tests.dist import trainer_worker as w

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]


def _spawn(fn, *args, **kwargs):
    return devlayer.spawn(
        partial(fn, *args, **kwargs), nprocs=2, backend="cpu", timeout=60, join_timeout=250
    )


def test_grad_accum_all_reduces_gradients_once_per_optimizer_step(clean_env):
    # 96 samples, global batch 16, grad_accum 2: 12 micro-batches of 4 per rank, 6 steps.
    r0, r1 = _spawn(w.count_gradient_allreduces, 2)
    assert r0 == r1
    per_batch = r0["per_batch"]
    assert len(per_batch) == 12 and r0["steps"] == 6
    # no_sync on the first micro-batch of each window: no all-reduce there at all.
    assert per_batch[0::2] == [0] * 6, per_batch
    buckets = per_batch[1]
    assert buckets >= 1 and per_batch[1::2] == [buckets] * 6, per_batch
    assert r0["total"] == r0["steps"] * buckets


def test_grad_accum_one_all_reduces_every_micro_batch(clean_env):
    # The counter itself works: without accumulation every micro-batch is a step.
    r0, _ = _spawn(w.count_gradient_allreduces, 1)
    assert r0["steps"] == 6 and len(r0["per_batch"]) == 6 and min(r0["per_batch"]) >= 1


@pytest.mark.parametrize(("mode", "factor"), [("linear", 2.0), ("sqrt", math.sqrt(2.0))])
def test_lr_scaling_at_world_size_two(clean_env, mode, factor):
    base = 0.05
    r0, r1 = _spawn(w.lr_scaling_run, mode, base)
    # Scaled once (not twice, not never), also in the scheduler's base_lrs: the LambdaLR
    # recomputes the rate from them at every step.
    assert r0["lrs"] == r1["lrs"] == pytest.approx([base * factor] * 2, rel=1e-12)
    assert r0["group_lr"] == pytest.approx(base * factor, rel=1e-12)
    # The optimizer really stepped with it: one rank with the scaled lr set by hand sees the
    # same global batches and ends with the same weights.
    with devlayer.init(backend="cpu"):
        single = w.lr_scaling_run(None, base * factor)
    assert single["lrs"] == pytest.approx(r0["lrs"], rel=1e-12)
    for key, value in single["weights"].items():
        torch.testing.assert_close(r0["weights"][key], value, rtol=1e-5, atol=1e-6)


def test_short_last_accumulation_window_still_steps(clean_env):
    # 12 samples, global batch 8, 2 ranks, grad_accum 2: 3 micro-batches of 2 per rank and
    # epoch, so 2 optimizer steps per epoch (the last one from a window of one).
    accum, other = _spawn(w.short_last_window, 2)
    assert accum["steps"] == other["steps"] == [2, 4]
    # That short window is averaged over its own micro-batch: the same update as
    # grad_accum=1, whose last batch is the same 2 samples per rank.
    plain, _ = _spawn(w.short_last_window, 1)
    assert plain["steps"] == [2, 4]
    for key, value in plain["weights"].items():
        torch.testing.assert_close(accum["weights"][key], value, rtol=1e-5, atol=1e-6)


def test_validation_loss_is_the_exact_full_set_loss_on_an_odd_set(clean_env):
    r0, r1 = _spawn(w.odd_validation_set)
    assert r0["val_loss"] == r1["val_loss"]
    exact = w.full_set_loss(r0["weights"], w.make_data(7, seed=5), torch.nn.Linear(4, 1))
    assert r0["val_loss"] == pytest.approx(exact, rel=1e-6)
