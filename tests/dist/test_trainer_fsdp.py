"""Trainer(strategy="fsdp") on real gloo ranks: same steps as DDP, sharded checkpoints."""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import pytest
import torch

from devlayer.testing import run_ranks
from tests.dist import fsdp_trainer_worker as worker
from tests.dist.trainer_worker import make_model

pytestmark = [pytest.mark.dist, pytest.mark.timeout(420)]


def _run(nprocs: int, strategy: str, **kw: object) -> list[dict]:
    return run_ranks(functools.partial(worker.fit, strategy, **kw), nprocs, timeout=300)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "options", [{}, {"grad_accum": 2, "clip_grad": 0.05}], ids=["plain", "accum-clip"]
)
def test_fsdp_trainer_matches_ddp_step_by_step_and_holds_half_the_state(clean_env, options):
    ddp = _run(2, "ddp", **options)
    fsdp = _run(2, "fsdp", **options)
    assert fsdp[0]["param_type"] == "DTensor" and ddp[0]["param_type"] == "Parameter"
    for d, f in zip(ddp, fsdp, strict=True):
        assert len(f["losses"]) == len(d["losses"]) == 12 * options.get("grad_accum", 1)
        assert f["losses"] == pytest.approx(d["losses"], rel=1e-5, abs=1e-6)
    for key, value in ddp[0]["weights"].items():
        assert torch.allclose(fsdp[0]["weights"][key], value, rtol=1e-4, atol=1e-6), key
    assert fsdp[1]["weights"] == {}  # gathered into rank 0's CPU memory only
    for d, f in zip(ddp[0]["history"], fsdp[0]["history"], strict=True):
        assert f["val_loss"] == pytest.approx(d["val_loss"], rel=1e-5)
    total = fsdp[0]["total"]
    assert ddp[0]["local"] == total
    assert sum(r["local"] for r in fsdp) == total
    assert all(abs(r["local"] - total / 2) <= 17 for r in fsdp), [r["local"] for r in fsdp]


def test_fsdp_validation_with_uneven_batches_per_rank_is_exact(clean_env):
    """3 validation samples, 1 per batch: rank 0 runs 2 forwards, rank 1 one real + one filler."""
    ddp = _run(2, "ddp", max_epochs=1, val_samples=3, batch_size=2)
    fsdp = _run(2, "fsdp", max_epochs=1, val_samples=3, batch_size=2)
    assert fsdp[0]["history"][0]["val_loss"] == pytest.approx(
        ddp[0]["history"][0]["val_loss"], rel=1e-5
    )


def test_fsdp_fp16_skips_a_step_on_every_rank_when_one_rank_sees_an_inf(clean_env):
    """An inf in rank 1's shard only: every rank skips that step (one all-reduced flag), so
    the result equals a run where both ranks saw it; a per-rank scaler would diverge."""
    kw = {"precision": "16-mixed", "max_epochs": 2, "val_samples": 0, "inf_at_step": 3}
    one = _run(2, "fsdp", inf_ranks=(1,), **kw)
    both = _run(2, "fsdp", inf_ranks=(0, 1), **kw)
    clean = _run(2, "fsdp", **{**kw, "inf_at_step": None})
    assert one[0]["scale"] == one[1]["scale"] == clean[0]["scale"] / 2  # backed off once
    assert _equal(one[0]["weights"], both[0]["weights"])
    assert not _equal(one[0]["weights"], clean[0]["weights"])  # the step was skipped
    history = clean[0]["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]  # fp16 FSDP trains


def test_fsdp_early_stopping_stops_every_rank_at_the_same_epoch(clean_env):
    """Decided on metrics averaged over the ranks, as under DDP: both stop after epoch 2."""
    out = _run(2, "fsdp", max_epochs=5, early_stop=True)
    assert [r["stop_reason"] for r in out] == ["early_stopping", "early_stopping"]
    assert [len(r["history"]) for r in out] == [2, 2]


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def test_fsdp_checkpoints_are_sharded_and_resume_bitwise(clean_env, tmp_path):
    whole = _run(
        2,
        "fsdp",
        max_epochs=None,
        max_steps=10,
        checkpoint_dir=str(tmp_path / "a"),
        checkpoint_every=2,
    )
    _run(
        2,
        "fsdp",
        max_epochs=None,
        max_steps=4,
        checkpoint_dir=str(tmp_path / "b"),
        checkpoint_every=2,
    )
    resumed = _run(
        2,
        "fsdp",
        max_epochs=None,
        max_steps=10,
        checkpoint_dir=str(tmp_path / "b"),
        checkpoint_every=2,
    )
    assert resumed[0]["resumed_from"].endswith("step-000000004")
    assert _equal(resumed[0]["weights"], whole[0]["weights"])
    assert resumed[0]["history"][-1]["train_loss"] == whole[0]["history"][-1]["train_loss"]
    newest = tmp_path / "a" / "step-000000010"
    m = _manifest(newest)
    assert m["format_version"] == 3 and m["world_size"] == 2
    assert sorted(m["shards"]) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert sorted(p.name for p in (newest / "shards").iterdir()) == sorted(m["shards"])
    state = torch.load(newest / "state.pt", weights_only=True)
    assert state["model"] is None and state["optimizer"] is None  # no rank gathered them
    # Every rank wrote its own file (the per-rank halves are checked in memory above; this
    # model is too small for the file sizes to show them under DCP's per-item overhead).
    assert all(m["shards"][f"__{r}_0.distcp"]["size"] > 0 for r in (0, 1))


@pytest.mark.parametrize(("saved_by", "resumed_by"), [(2, 1), (1, 2)])
def test_fsdp_checkpoint_resumes_at_another_world_size(clean_env, tmp_path, saved_by, resumed_by):
    ckpt = str(tmp_path / "ck")
    kw = {"max_epochs": None, "max_steps": 6, "checkpoint_dir": ckpt, "checkpoint_every": 2}
    saved = _run(saved_by, "fsdp", **kw)
    # max_steps is reached already: resume, train nothing, and report the loaded weights.
    loaded = _run(resumed_by, "fsdp", allow_world_size_change=True, **kw)
    assert loaded[0]["resumed_from"].endswith("step-000000006")
    assert _equal(loaded[0]["weights"], saved[0]["weights"])
    more = _run(
        resumed_by,
        "fsdp",
        allow_world_size_change=True,
        **{**kw, "max_steps": 8},
    )
    assert more[0]["global_step"] == 8 and not _equal(more[0]["weights"], saved[0]["weights"])


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_fsdp_damaged_shard_is_refused_and_the_previous_checkpoint_used(
    clean_env, tmp_path, damage
):
    ckpt = tmp_path / "ck"
    kw = {"max_epochs": None, "checkpoint_dir": str(ckpt), "checkpoint_every": 2}
    _run(2, "fsdp", max_steps=6, **kw)
    shard = ckpt / "step-000000006" / "shards" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        del data[len(data) // 2 :]
    shard.write_bytes(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = _run(2, "fsdp", max_steps=4, **kw)
    assert out[0]["resumed_from"].endswith("step-000000004")
    assert out[0]["global_step"] == 4


def test_fsdp_export_loads_into_the_plain_model_with_weights_only(clean_env, tmp_path):
    path = tmp_path / "model.pt"
    out = _run(2, "fsdp", max_epochs=1, export=str(path))
    assert out[0]["exported"] == str(path) and out[1]["exported"] is None
    model = make_model()
    model.load_state_dict(torch.load(path, weights_only=True))
    model.eval()
    with torch.no_grad():
        probe = model(torch.linspace(-1, 1, 20).reshape(5, 4))
    assert torch.allclose(probe, torch.tensor(out[0]["probe"]), rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temp file left


def test_ddp_export_called_on_rank_zero_alone_needs_no_other_rank(clean_env, tmp_path):
    """The usual `if is_main(): save` pattern: under DDP export() runs no collective, so
    rank 0 alone writes the file instead of waiting for the others until the timeout."""
    path = tmp_path / "model.pt"
    out = _run(2, "ddp", max_epochs=1, export=str(path), export_on_main_only=True)
    assert out[0]["exported"] == str(path) and out[1]["exported"] is None
    model = make_model()
    model.load_state_dict(torch.load(path, weights_only=True))
    assert _equal(model.state_dict(), out[0]["weights"])
