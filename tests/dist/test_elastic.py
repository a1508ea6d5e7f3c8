"""Resume at a changed world size, exactly (issue 23): real gloo ranks, spawned.

Every run records, per optimizer step, the sample indices each rank trained on; a run cut
at step k and resumed at another world size must train, step by step, on the same multiset
of samples as the run that never stopped, and end with the same weights within float
tolerance (only the reduction order differs). At an unchanged world size: bitwise.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch

import devlayer
from tests.dist.elastic_worker import EPOCHS, GLOBAL_BATCH, N_SAMPLES, run, steps_seen

pytestmark = [pytest.mark.dist, pytest.mark.timeout(600)]

#: Optimizer steps of the whole run: 13 an epoch (100 samples padded to 104).
TOTAL_STEPS = EPOCHS * -(-N_SAMPLES // GLOBAL_BATCH)


def _spawn(world: int, fn: Any, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
    return devlayer.spawn(
        partial(fn, *args, **kwargs), nprocs=world, backend="cpu", timeout=120, join_timeout=500
    )


def _straight(folder: Path, world: int, **kw: Any) -> dict[str, Any]:
    """The uninterrupted run at ``world`` ranks (tag ``straight``)."""
    return _spawn(world, run, str(folder), "straight", ckpt="ckpt-straight", **kw)[0]


def _interrupted(folder: Path, worlds: list[int], cuts: list[int], **kw: Any) -> dict[str, Any]:
    """Run at ``worlds[i]`` ranks until step ``cuts[i]``, resuming each part from the last
    checkpoint; the last part runs to the end."""
    result: dict[str, Any] = {}
    for i, world in enumerate(worlds):
        max_steps = cuts[i] if i < len(cuts) else None
        result = _spawn(world, run, str(folder), f"part{i}", max_steps=max_steps, **kw)[0]
    return result


def _assert_same_steps(folder: Path, parts: int) -> None:
    straight = steps_seen(folder, ["straight"])
    resumed = steps_seen(folder, [f"part{i}" for i in range(parts)])
    assert list(straight) == list(range(TOTAL_STEPS))
    assert list(resumed) == list(straight)
    differing = [s for s in straight if straight[s] != resumed[s]]
    assert not differing, f"steps with other samples: {differing}"
    for epoch in range(EPOCHS):  # every sample of each epoch, each once (plus the padding)
        steps = range(epoch * TOTAL_STEPS // EPOCHS, (epoch + 1) * TOTAL_STEPS // EPOCHS)
        seen = [i for s in steps for i in resumed[s]]
        assert set(seen) == set(range(N_SAMPLES))
        assert len(seen) == len(steps) * GLOBAL_BATCH


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    ("worlds", "cuts"),
    [([2, 1], [5]), ([1, 2], [5]), ([2, 4, 2], [5, 17])],
    ids=["2-to-1", "1-to-2", "2-to-4-to-2"],
)
def test_e23_4_changed_world_trains_on_the_same_samples_every_step(
    clean_env, tmp_path, worlds, cuts
):
    """E23-4: a DDP run cut at step k (mid-epoch) and resumed at another world size
    (2 -> 1, 1 -> 2, 2 -> 4 -> 2) trains every optimizer step on the same multiset of sample
    indices (over all ranks) as the run that never stopped, sees every sample of each epoch
    once, takes the same number of steps and ends with the same weights within float64
    tolerance (the reduction order differs)."""
    straight = _straight(tmp_path, worlds[0])
    resumed = _interrupted(tmp_path, worlds, cuts)
    _assert_same_steps(tmp_path, len(worlds))
    assert resumed["global_step"] == straight["global_step"] == TOTAL_STEPS
    _assert_close(resumed["weights"], straight["weights"])
    assert [h["train_loss"] for h in resumed["history"]] == pytest.approx(
        [h["train_loss"] for h in straight["history"]], rel=1e-9
    )


def test_e23_5_unchanged_world_resume_stays_bitwise(clean_env, tmp_path):
    """E23-5: at an unchanged world size (2 -> 2, cut mid-epoch, with the padded last step
    of each epoch) the resumed run is bitwise the run that never stopped: same samples per
    step, same weights, same losses."""
    straight = _straight(tmp_path, 2)
    resumed = _interrupted(tmp_path, [2, 2], [5])
    _assert_same_steps(tmp_path, 2)
    assert all(torch.equal(resumed["weights"][k], v) for k, v in straight["weights"].items())
    assert [h["train_loss"] for h in resumed["history"]] == [
        h["train_loss"] for h in straight["history"]
    ]


def test_e23_6_the_global_batch_is_kept_and_the_change_is_recorded(clean_env, tmp_path):
    """E23-6: 2 -> 1 keeps the per-rank micro-batch (4) and doubles grad_accum (1 -> 2), so
    the global batch stays 8; the metrics file gets a ``world_size_change`` line with the
    step, both sizes and what was re-derived."""
    metrics = tmp_path / "metrics.jsonl"
    resumed = _interrupted(tmp_path, [2, 1], [5], metrics_file=str(metrics))
    assert resumed["grad_accum"] == 2
    events = [json.loads(x) for x in metrics.read_text().splitlines() if '"event"' in x]
    assert events == [
        {
            "event": "world_size_change",
            "global_step": 5,
            "epoch": 0,
            "old_world_size": 2,
            "new_world_size": 1,
            "rederived": {"grad_accum": [1, 2], "rng": "re-seeded from (seed, step, rank)"},
        }
    ]


def test_e23_7_fsdp_changed_world_trains_on_the_same_samples(clean_env, tmp_path):
    """E23-7: the same under strategy="fsdp" (sharded checkpoint, resharded on load):
    2 -> 4 ranks at step 5, same samples per step and weights within tolerance."""
    straight = _straight(tmp_path, 2, strategy="fsdp")
    resumed = _interrupted(tmp_path, [2, 4], [5], strategy="fsdp")
    _assert_same_steps(tmp_path, 2)
    _assert_close(resumed["weights"], straight["weights"])


def test_e23_3_a_global_batch_that_does_not_split_is_refused_or_rescaled(clean_env, tmp_path):
    """E23-3: 2 -> 3 ranks with global batch 8 is refused on every rank with
    WorldSizeChangeError naming the batch, the world size and the opt-in; with
    allow_world_size_change="rescale_lr" (from the checkpoint at the end of epoch 1) it
    runs with per-rank batch 4 on 3 ranks (global batch 12) and the learning rate scaled
    by 12/8."""
    _spawn(2, run, str(tmp_path), "part0", max_steps=13)
    with pytest.raises(Exception, match=r"= 8\).*world_size=3.*rescale_lr"):
        _spawn(3, run, str(tmp_path), "part1")
    results = _spawn(3, run, str(tmp_path), "part2", allow="rescale_lr", max_steps=14)
    assert results[0]["global_step"] == 14
    seen = steps_seen(tmp_path, ["part2"])
    assert {step: len(v) for step, v in seen.items()} == {13: 12}
    assert results[0]["history"][-1]["lr"] == pytest.approx(0.05 * 0.81 * 1.5, rel=1e-12)
