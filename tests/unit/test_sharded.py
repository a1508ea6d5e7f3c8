"""devlayer.train.sharded: the sharded checkpoint format at world size 1 (in process).

The multi-rank behaviour (bitwise resume, resharding, damaged shards) is in
tests/dist/test_trainer_fsdp.py; here: what is and is not unpickled, and what the manifest
must list.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch

import devlayer
from devlayer.train import checkpoint as ckpt
from devlayer.train import manifest
from devlayer.train.errors import CheckpointCorruptError, CheckpointError
from devlayer.train.sharded import MetadataUnpickler
from tests.dist.trainer_worker import make_data, make_model


def _fit(checkpoint_dir: Path, max_steps: int = 4, strategy: str = "fsdp") -> devlayer.Trainer:
    model = make_model()
    trainer = devlayer.Trainer(
        model,
        torch.optim.AdamW(model.parameters(), lr=0.01),
        torch.nn.functional.mse_loss,
        strategy=strategy,
        batch_size=16,
        max_steps=max_steps,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=2,
        progress=False,
        num_workers=0,
        seed=7,
    )
    trainer.fit(make_data())
    return trainer


@pytest.fixture
def cpu(clean_env):
    with devlayer.init(backend="cpu") as st:
        yield st


def _rewrite(folder: Path, name: str, data: bytes) -> None:
    """Replace a shard file and fix the manifest, as an attacker who can write both would."""
    (folder / "shards" / name).write_bytes(data)
    m = json.loads((folder / "manifest.json").read_text())
    m["shards"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    m["manifest_sha256"] = manifest.digest(m)
    (folder / "manifest.json").write_text(json.dumps(m))


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # what a crafted .metadata would carry
        return (os.system, (f"touch {self.marker}",))


def test_the_metadata_unpickler_builds_dcp_metadata_and_nothing_else(tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(pickle.UnpicklingError, match=r"(posix|os)\.system is not part of DCP"):
        MetadataUnpickler(io.BytesIO(pickle.dumps(_Payload(str(marker))))).load()
    assert not marker.exists()
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # "assuming ... a single process": yes
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"w": torch.ones(3)}, checkpoint_id=str(tmp_path / "c"), no_dist=True)
    raw = (tmp_path / "c" / ".metadata").read_bytes()
    metadata = MetadataUnpickler(io.BytesIO(raw)).load()
    assert type(metadata).__name__ == "Metadata" and "w" in metadata.state_dict_metadata


def test_world_one_fsdp_trainer_writes_a_sharded_format_3_checkpoint(cpu, tmp_path):
    _fit(tmp_path)
    folder = tmp_path / "step-000000004"
    m = json.loads((folder / "manifest.json").read_text())
    assert m["format_version"] == 3 and sorted(m["shards"]) == [".metadata", "__0_0.distcp"]
    resumed = _fit(tmp_path, max_steps=6)
    assert resumed.resumed_from == folder and resumed.state.global_step == 6


def test_a_crafted_metadata_with_a_matching_manifest_is_refused_and_never_run(cpu, tmp_path):
    _fit(tmp_path)
    folder = tmp_path / "step-000000004"
    marker = tmp_path / "ran"
    _rewrite(folder, ".metadata", pickle.dumps(_Payload(str(marker))))
    with pytest.raises(CheckpointError, match="not part of DCP checkpoint metadata"):
        _fit(tmp_path, max_steps=6)
    assert not marker.exists()


def test_a_shard_file_the_manifest_does_not_list_is_never_read(cpu, tmp_path):
    _fit(tmp_path)
    folder = tmp_path / "step-000000004"
    m = json.loads((folder / "manifest.json").read_text())
    del m["shards"]["__0_0.distcp"]
    m["manifest_sha256"] = manifest.digest(m)
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=r"refers to '__0_0.distcp', which its manifest"):
        _fit(tmp_path, max_steps=6)


@pytest.mark.parametrize("name", ["../state.pt", "..", "a/b", ""])
def test_a_shard_name_that_leaves_the_folder_makes_the_manifest_invalid(cpu, tmp_path, name):
    _fit(tmp_path)
    folder = tmp_path / "step-000000004"
    m = json.loads((folder / "manifest.json").read_text())
    m["shards"][name] = {"size": 0, "sha256": "0" * 64}
    m["manifest_sha256"] = manifest.digest(m)
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointCorruptError, match="shards="):
        ckpt.CheckpointStore(tmp_path).verify(folder)


def test_an_fsdp_trainer_refuses_a_full_model_checkpoint_and_ddp_reads_shards(cpu, tmp_path):
    _fit(tmp_path / "ddp", strategy="ddp")
    with pytest.raises(CheckpointError, match=r"saved with strategy='ddp'"):
        _fit(tmp_path / "ddp", max_steps=6)
    _fit(tmp_path / "fsdp")
    assert _fit(tmp_path / "fsdp", max_steps=6, strategy="ddp").state.global_step == 6


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"strategy": "zero"}, "strategy='zero': use 'ddp' or 'fsdp'"),
        ({"fsdp": {"min_params": 10}}, "fsdp= options need strategy='fsdp'"),
        ({"strategy": "fsdp", "fsdp": {"precision": "bf16-mixed"}}, "maps its own precision="),
        ({"compile": "yes"}, "compile='yes': use True, False or a dict"),
    ],
)
def test_bad_strategy_and_compile_arguments_are_named(clean_env, kwargs, expected):
    from devlayer.errors import InvalidArgumentError

    model = make_model()
    with pytest.raises(InvalidArgumentError) as err:
        devlayer.Trainer(
            model, torch.optim.SGD(model.parameters(), lr=0.1), lambda a, b: a, **kwargs
        )
    assert expected in str(err.value)


def test_an_optimizer_that_already_stepped_is_refused_under_fsdp(cpu):
    from devlayer.errors import InvalidArgumentError
    from devlayer.train.fsdp import parameter_names, rebind_optimizer

    model = make_model()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    with pytest.raises(InvalidArgumentError, match="already holds state"):
        rebind_optimizer(opt, parameter_names(model), model)


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _sharded(fsdp):
    module = make_model()
    opt = torch.optim.AdamW(module.parameters(), lr=0.01)
    return fsdp.wrap(module, opt), opt


class _Recorder:
    """Wraps a DCP stager; records where each staged tensor lives and what it held."""

    def __init__(self, inner):
        self.inner, self.staged = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def stage(self, state_dict):
        out = self.inner.stage(state_dict)
        local = {k: getattr(v, "_local_tensor", v) for k, v in out["model"].items()}
        self.staged.append({k: (t.data_ptr(), t.clone()) for k, t in local.items()})
        return out


def test_c24_9_fsdp_background_saves_copy_into_one_staging_buffer(cpu, tmp_path, monkeypatch):
    """C24-9: under FSDP, the background save's staging on the training thread is a copy
    into CPU memory allocated at the first save and reused by the next (no new allocation,
    the cost that dominated the blocked time); what each save writes is still its own
    step's state, though the weights change before its shards are written."""
    from devlayer.train import strategy as strategies
    from devlayer.train.sharded import read_shards, shard_stager

    recorders = []

    def recording_stager():
        recorders.append(_Recorder(shard_stager()))
        return recorders[-1]

    monkeypatch.setattr(strategies, "shard_stager", recording_stager, raising=False)
    fsdp = strategies.FSDPStrategy()
    model, opt = _sharded(fsdp)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()  # the optimizer state exists and is staged too
    expected = []
    for name in ("a", "b"):
        folder = tmp_path / name
        expected.append({k: _full(v).clone() for k, v in model.state_dict().items()})
        _, temp, written = fsdp.background_state(model, opt, lambda f=folder: f.mkdir() or f)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # the next steps change the weights before the write
        written()
        assert temp == folder
    (recorder,) = recorders  # one stager for both saves
    first, second = recorder.staged
    assert {k: ptr for k, (ptr, _) in first.items()} == {k: ptr for k, (ptr, _) in second.items()}
    for name, want in zip(("a", "b"), expected, strict=True):
        fresh, fresh_opt = _sharded(strategies.FSDPStrategy())
        files = [p.name for p in (tmp_path / name / "shards").iterdir()]
        read_shards(tmp_path / name / "shards", files, fresh, fresh_opt, world_size=1)
        got = {k: _full(v) for k, v in fresh.state_dict().items()}
        assert all(torch.equal(got[k], want[k]) for k in want), name
    fsdp.release_staging()
