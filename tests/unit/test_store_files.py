"""Files the checkpoint store must never touch (issue 20, round 5: R5-F*).

A shared checkpoint folder is writable by others: a symlink, hard link or device planted
under a name the store or its lock writes must be refused or skipped, never followed for
writing or deleting. Also: export() only ever replaces a regular file, atomically.
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from devlayer.errors import InvalidArgumentError
from devlayer.train import checkpoint as ckpt
from devlayer.train.checkpoint import CheckpointError, CheckpointStore
from tests.helpers import toy_trainer

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX links, modes, FIFOs")


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    return victim


# -- R5-F1: the lock file -----------------------------------------------------------------


@posix_only
def test_r5_f1_planted_lock_symlink_is_refused_and_its_target_untouched(tmp_path):
    """A `.lock-step` symlink planted in the folder (pointing at a file the job can write) is
    refused by acquire_lock() with a CheckpointError saying it is a symbolic link, and the
    file it points to keeps its content: the lock never follows a link for writing."""
    victim = _victim(tmp_path)
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / ".lock-step").symlink_to(victim)
    with pytest.raises(CheckpointError, match="symbolic link") as info:
        CheckpointStore(tmp_path / "ck").acquire_lock()
    assert str(tmp_path / "ck" / ".lock-step") in str(info.value)
    assert "remove it" in str(info.value)
    assert victim.read_text() == "precious\n"


@posix_only
def test_r5_f1_planted_lock_hard_link_is_refused_and_its_target_untouched(tmp_path):
    """A `.lock-step` that is a hard link to another file (two names) is refused before it is
    truncated, so a hard link cannot redirect the holder record into a victim file."""
    victim = _victim(tmp_path)
    (tmp_path / "ck").mkdir()
    os.link(victim, tmp_path / "ck" / ".lock-step")
    with pytest.raises(CheckpointError, match="2 names"):
        CheckpointStore(tmp_path / "ck").acquire_lock()
    assert victim.read_text() == "precious\n"


@posix_only
@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_r5_f1_lock_file_of_another_user_is_refused(tmp_path):
    """A `.lock-step` owned by another user is refused (naming its owner uid) and not
    rewritten: only a lock file this user owns is ever written."""
    (tmp_path / "ck").mkdir()
    lock = tmp_path / "ck" / ".lock-step"
    lock.write_text("someone else's\n")
    os.chown(lock, 65534, 65534)
    with pytest.raises(CheckpointError, match="owned by uid 65534"):
        CheckpointStore(tmp_path / "ck").acquire_lock()
    assert lock.read_text() == "someone else's\n"


@posix_only
@pytest.mark.timeout(60)
def test_r5_f1_lock_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    """A FIFO planted as `.lock-step` is refused as "a FIFO" without blocking on its open."""
    (tmp_path / "ck").mkdir()
    os.mkfifo(tmp_path / "ck" / ".lock-step")
    with pytest.raises(CheckpointError, match="FIFO"):
        CheckpointStore(tmp_path / "ck").acquire_lock()


# -- R5-F3: a private store's lock file ---------------------------------------------------


@posix_only
def test_r5_f3_private_store_lock_file_is_owner_only(tmp_path):
    """CheckpointStore(private=True) leaves `.lock-step` (host, pid, argv) at 0600 under umask
    022, also when an earlier, non-private run left it at 0644."""
    old = os.umask(0o022)
    try:
        with CheckpointStore(tmp_path / "a", private=True).lock() as store:
            assert stat.S_IMODE(store.lock_path.stat().st_mode) == 0o600
        with CheckpointStore(tmp_path / "b").lock() as store:
            assert stat.S_IMODE(store.lock_path.stat().st_mode) == 0o644
        with CheckpointStore(tmp_path / "b", private=True).lock() as store:
            assert stat.S_IMODE(store.lock_path.stat().st_mode) == 0o600
            assert json.loads(store.lock_path.read_text())["pid"] == os.getpid()
    finally:
        os.umask(old)


@posix_only
def test_r5_f1_planted_temp_symlink_is_removed_as_a_link_only(tmp_path):
    """A `.tmp-...` entry planted as a symlink to a folder (a dead writer's name) is removed by
    cleanup_temp() as a link: the folder it points to and its files survive."""
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    store = CheckpointStore(tmp_path / "ck")
    store.check_writable()
    planted = tmp_path / "ck" / f".tmp-step-000000003.new.999999999.{ckpt.host_tag()}.ab"
    planted.symlink_to(target, target_is_directory=True)
    assert store.cleanup_temp() == [planted]
    assert not planted.is_symlink() and (target / "keep.txt").read_text() == "keep"


# -- R5-F2: export() ------------------------------------------------------------------------


@pytest.fixture
def trained(clean_env):
    """A Trainer fitted for one epoch at world size 1 (export() needs fit() first)."""
    from torch.utils.data import TensorDataset

    import devlayer

    with devlayer.init(backend="cpu"):
        torch.manual_seed(0)
        trainer = toy_trainer(torch.nn.Linear(4, 2), max_epochs=1)
        trainer.fit(TensorDataset(torch.rand(16, 4), torch.rand(16, 2)))
        yield trainer


def _special(kind: str, path: Path) -> str:
    if kind == "fifo":
        os.mkfifo(path)
        return "a FIFO (named pipe)"
    if kind == "symlink":
        path.symlink_to(path.parent / "elsewhere.pt")
        return "a symbolic link"
    path.mkdir()
    (path / "inside.txt").write_text("x")
    return "a directory"


@posix_only
@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink"])
def test_r5_f2_export_refuses_a_path_that_is_no_regular_file(trained, tmp_path, kind):
    """export(path) where path is a FIFO, a directory or a symlink raises CheckpointError
    naming what is there and the fix, and leaves it as it was (a device node would be replaced
    otherwise)."""
    target = tmp_path / "model.pt"
    what = _special(kind, target)
    with pytest.raises(
        CheckpointError, match=re.escape(f"is {what}, expected a regular file")
    ) as info:
        trained.export(target)
    assert str(target) in str(info.value) and "another path" in str(info.value)
    kept = {"fifo": stat.S_ISFIFO, "directory": stat.S_ISDIR, "symlink": stat.S_ISLNK}[kind]
    assert kept(os.lstat(target).st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temp file left


def test_r5_f2_export_over_a_regular_file_still_replaces_it(trained, tmp_path):
    """Re-exporting over an earlier export (a regular file) replaces it with the new weights."""
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")
    assert trained.export(target) == target
    state = torch.load(target, weights_only=True)
    assert torch.equal(state["weight"], trained.model.state_dict()["weight"])


def test_r5_f2_failed_export_keeps_the_previous_good_file(trained, tmp_path, monkeypatch):
    """An export that fails halfway (torch.save writes part of the data, then raises) raises
    CheckpointError and leaves the previous export byte for byte (the write is atomic), with
    no temporary file beside it."""
    target = tmp_path / "model.pt"
    trained.export(target)
    good = target.read_bytes()
    real_save = torch.save

    def half_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"half written garbage")
        raise RuntimeError("simulated failure inside torch.save")

    monkeypatch.setattr(torch, "save", half_save)
    with pytest.raises(CheckpointError, match=r"simulated failure inside torch\.save"):
        trained.export(target)
    monkeypatch.setattr(torch, "save", real_save)
    assert target.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


FSIZE_JOB = """
    import resource, signal, sys, torch, devlayer
    from torch.utils.data import TensorDataset
    from devlayer.train.errors import CheckpointError
    with devlayer.init(backend="cpu"):
        net = torch.nn.Linear(256, 256)
        trainer = devlayer.Trainer(net, torch.optim.SGD(net.parameters(), lr=0.01),
                                   torch.nn.functional.mse_loss, batch_size=8, max_epochs=1,
                                   progress=False, num_workers=0)
        trainer.fit(TensorDataset(torch.rand(8, 256), torch.rand(8, 256)))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit: EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.RLIM_INFINITY))
        try:
            trainer.export(sys.argv[1])
        except CheckpointError as exc:
            print("CHECKPOINT_ERROR", exc)
"""


@posix_only
@pytest.mark.timeout(120)
def test_r5_f2_export_over_the_file_size_limit_is_a_checkpoint_error(tmp_path):
    """Under RLIMIT_FSIZE (SIGXFSZ ignored) export() raises the documented CheckpointError
    naming the OS error (File too large) and the disk advice, not torch's RuntimeError, and
    leaves no temporary file."""
    import textwrap

    from tests.helpers import run_py

    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(FSIZE_JOB))
    out = tmp_path / "out"
    out.mkdir()
    proc = run_py([str(script), str(out / "model.pt")], timeout=100)
    assert "CHECKPOINT_ERROR" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert "File too large" in proc.stdout and "disk is full" in proc.stdout
    assert list(out.iterdir()) == []


# -- R5-F4: arguments that are no path ----------------------------------------------------


@pytest.mark.parametrize("value", [None, 3, 1.5, ["ck"], b"ck"])
def test_r5_f4_directory_that_is_no_path_is_refused_naming_the_argument(value):
    """CheckpointStore(None) (or an int, float, list, bytes) raises InvalidArgumentError naming
    `directory`, the value and its type, instead of pathlib's "expected str, bytes or
    os.PathLike"; the Trainer's checkpoint store goes through the same check."""
    from devlayer.train.resume import TrainingCheckpoints

    for make in (CheckpointStore, TrainingCheckpoints):
        with pytest.raises(InvalidArgumentError, match=r"directory=.*\(" + type(value).__name__):
            make(value)


# -- R5-F5: tests that used to let a wrong change through ----------------------------------


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads fd paths from /proc")
def test_r5_f5_sharded_save_syncs_the_shards_folder_before_the_rename(tmp_path, monkeypatch):
    """A sharded save (files in the temporary folder's `shards/`, committed by save(temp=))
    fsyncs each file's folder: `shards/` itself (its new entries), then the checkpoint folder,
    all before the rename into place, and the directory after it."""
    store = CheckpointStore(tmp_path)
    temp = store.new_temp(1)
    (temp / "shards").mkdir()
    for name in ("__0_0.distcp", "__1_0.distcp", ".metadata"):
        (temp / "shards" / name).write_bytes(name.encode())
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(f"fsync {os.readlink(f'/proc/self/fd/{fd}')}")
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append(f"replace {Path(dst).name}")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = store.save({"w": torch.ones(1)}, step=1, epoch=0, world_size=2, temp=temp)
    rename = events.index("replace step-000000001")
    assert f"fsync {temp / 'shards'}" in events[:rename], events
    assert f"fsync {temp}" in events[:rename] and events[rename + 1] == f"fsync {tmp_path}"
    assert sorted(store.verify(path)["shards"]) == [".metadata", "__0_0.distcp", "__1_0.distcp"]


def _format_1(path: Path) -> None:
    """Rewrite a checkpoint's manifest as format 1: no run id, no manifest checksum."""
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = 1
    for key in ("run_id", "manifest_sha256"):
        manifest.pop(key, None)
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("kind", ["no-run-id", "format-1"])
def test_r5_f5_fresh_run_refuses_a_folder_of_checkpoints_without_run_id(tmp_path, clean_env, kind):
    """resume=None in a folder whose checkpoints carry no run id (a CheckpointStore without
    run_id, or format 1) raises CheckpointRunError naming the steps, and the checkpoints stay:
    the fresh run would otherwise prune them."""
    import devlayer
    from devlayer.train.checkpoint import CheckpointRunError
    from devlayer.train.resume import TrainingCheckpoints

    store = CheckpointStore(tmp_path, keep=5)
    for step in (2, 4):
        path = store.save({"w": torch.ones(1)}, step=step, epoch=0, world_size=1)
        if kind == "format-1":
            _format_1(path)
    assert store.runs() == {}
    with devlayer.init(backend="cpu"):
        checkpoints = TrainingCheckpoints(tmp_path)
        with pytest.raises(CheckpointRunError, match="step-000000002, step-000000004"):
            checkpoints.begin(None)
        checkpoints.end()
    assert [p.name for p in store.list()] == ["step-000000002", "step-000000004"]
    assert not checkpoints.store.locked  # the refusal released the folder lock


def test_r5_f5_cleanup_temp_releases_the_lock_it_took(tmp_path):
    """cleanup_temp() on a store that does not hold the lock takes it for the call and releases
    it: afterwards the store is unlocked and another store of this process can lock the folder
    (a leaked lock would refuse it as "already in use by this process"). A store that held the
    lock before keeps it."""
    store = CheckpointStore(tmp_path)
    store.check_writable()
    dead = tmp_path / f".tmp-step-000000003.new.999999999.{ckpt.host_tag()}.ab"
    dead.mkdir()
    assert store.cleanup_temp() == [dead]  # removing another host's or dead entry: locked
    assert not store.locked
    with CheckpointStore(tmp_path).lock() as other:
        assert other.locked
    with store.lock():
        store.cleanup_temp()
        assert store.locked  # it held the lock before the call: still holds it


# -- R5-F6: forged checkpoints (a recomputed manifest) --------------------------------------


def _trainer_payload() -> tuple[dict[str, Any], torch.nn.Module]:
    from devlayer.train.checkpoint import rng_state

    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    payload = {
        "model": net.state_dict(),
        "optimizer": opt.state_dict(),
        "scaler": None,
        "scheduler": None,
        "epoch": 1,
        "batches_done": 0,
        "global_step": 4,
        "history": [{"epoch": 0, "train_loss": 0.5}],
        "early_stopping": {
            "best": 0.5,
            "bad_epochs": 0,
            "hits": 0,
            "monitor": "val_loss",
            "mode": "min",
        },
        "ranks": [{"rng": rng_state(), "loss_sum": 0.0, "samples": 0}],
        "lr_factor": 1.0,
    }
    return payload, net


FORGED = [
    ("history", "x", "a list of dicts"),
    ("history", ["x"], "a list of dicts"),
    ("lr_factor", 0.0, "a finite number > 0"),
    ("lr_factor", float("nan"), "a finite number > 0"),
    ("lr_factor", "1", "a finite number > 0"),
    ("epoch", -1, "an int >= 0"),
    ("epoch", True, "an int >= 0"),
    ("batches_done", 1.5, "an int >= 0"),
    ("global_step", None, "an int >= 0"),
    ("ranks", [], "a list of 1 dict"),
    ("ranks", [{"rng": {}, "loss_sum": "x", "samples": 0}], "a list of 1 dict"),
    ("ranks", [{"rng": 3, "loss_sum": 0.0, "samples": 0}], "a list of 1 dict"),
    ("ranks", [{"rng": {"torch": "x"}, "loss_sum": 0.0, "samples": 0}], "a list of 1 dict"),
    ("ranks", [{"rng": {"python": (3, "ab", None)}, "loss_sum": 0, "samples": 0}], "rng_state"),
    ("optimizer", [1], "a dict (a state_dict)"),
    ("scheduler", "x", "a dict (a state_dict) or None"),
    ("scaler", 7, "a dict (a state_dict) or None"),
    ("early_stopping", {"best": "x", "bad_epochs": 0, "hits": 0}, "best"),
    ("early_stopping", {"best": 1.0, "bad_epochs": 0, "hits": 0, "mode": "up"}, "'mode'"),
    ("early_stopping", {"best": 1.0, "bad_epochs": 0, "hits": 0, "monitor": 3}, "'monitor'"),
    ("model", None, "a dict (a state_dict)"),
]


@pytest.mark.parametrize(("field", "value", "expected"), FORGED, ids=lambda v: repr(v)[:20])
def test_r5_f6_forged_trainer_payload_field_is_refused_naming_it(field, value, expected, tmp_path):
    """A Trainer payload whose field has the wrong type or range (as a forger who recomputes
    the manifest can write) is refused by check_payload() with CheckpointCorruptError naming
    the field, the value and what was expected, before anything is applied; a missing
    required field too. A genuine payload passes."""
    from devlayer.train.checkpoint import CheckpointCorruptError
    from devlayer.train.resume import TrainingCheckpoints

    checkpoints = TrainingCheckpoints(tmp_path)
    payload, net = _trainer_payload()
    manifest = {"step": 4, "world_size": 1}
    checkpoints.check_payload(payload, manifest, net, tmp_path)  # the genuine one passes
    with pytest.raises(CheckpointCorruptError, match=re.escape(f"'{field}'")) as info:
        checkpoints.check_payload({**payload, field: value}, manifest, net, tmp_path)
    assert expected in str(info.value) and str(tmp_path) in str(info.value)
    assert "proves integrity, not authorship" in str(info.value)
    del payload[field]
    if field in ("epoch", "batches_done", "global_step", "ranks", "model"):
        with pytest.raises(CheckpointCorruptError, match=f"'{field}' is missing"):
            checkpoints.check_payload(payload, manifest, net, tmp_path)


def _forge(ckpt_dir: Path, **fields: Any) -> None:
    """Rewrite the newest checkpoint's payload and sign it again (a recomputed manifest)."""
    store = CheckpointStore(ckpt_dir, keep=5)
    path = store.latest()
    payload, manifest = store.load(path)
    forger = CheckpointStore(ckpt_dir, keep=5, run_id=manifest["run_id"])
    forger.save(
        {**payload, **fields},
        step=manifest["step"],
        epoch=manifest["epoch"],
        world_size=manifest["world_size"],
    )


@pytest.mark.parametrize(("field", "value"), [("history", "x"), ("lr_factor", 0.0)])
def test_r5_f6_forged_checkpoint_is_refused_by_the_trainer_before_it_resumes(
    field, value, tmp_path, clean_env, caplog
):
    """Through the Trainer: a checkpoint re-saved with history="x" or lr_factor=0.0 and a
    recomputed manifest makes fit(resume="auto") raise CheckpointCorruptError naming the field,
    without logging "resumed from" (no AttributeError / ZeroDivisionError after it)."""
    from torch.utils.data import TensorDataset

    import devlayer
    from devlayer.train.checkpoint import CheckpointCorruptError

    data = TensorDataset(torch.rand(16, 4), torch.rand(16, 2))

    def fit() -> None:
        torch.manual_seed(0)
        toy_trainer(
            torch.nn.Linear(4, 2), max_epochs=2, checkpoint_dir=tmp_path / "ck", checkpoint_every=1
        ).fit(data)

    with devlayer.init(backend="cpu"):
        fit()
        _forge(tmp_path / "ck", **{field: value})
        caplog.clear()
        with pytest.raises(CheckpointCorruptError, match=f"'{field}'"):
            fit()
    assert "resumed from" not in caplog.text


# -- R5-F7: smaller ------------------------------------------------------------------------


def _long_dir(tmp_path: Path, total: int) -> Path:
    """A folder path of exactly ``total`` characters below ``tmp_path`` (components <= 200)."""
    path = str(tmp_path)
    while len(path) < total:
        room = total - len(path) - 1
        path += "/" + "d" * min(200, room if room <= 200 else min(200, room - 2))
    assert len(path) == total
    return Path(path)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PATH_MAX is 4096 on Linux")
def test_r5_f7_too_long_checkpoint_path_fails_the_write_probe(tmp_path):
    """A 4,044-character checkpoint directory fails check_writable() (the start-up probe) with
    "File name too long" and the fix, instead of passing it and failing at the first save; a
    directory short enough for every name a save writes passes and saves."""
    long = _long_dir(tmp_path / "a", 4044)
    with pytest.raises(CheckpointError, match="File name too long") as info:
        CheckpointStore(long).check_writable()
    assert "shorter" in str(info.value)
    fits = _long_dir(tmp_path / "b", 3900)
    store = CheckpointStore(fits)
    store.check_writable()
    store.save({"w": torch.ones(1)}, step=1, epoch=0, world_size=1)
    assert [p.name for p in store.list()] == ["step-000000001"]
    assert not [p for p in fits.iterdir() if p.name.startswith(".tmp-")]


@posix_only
def test_r5_f7_symlink_loop_as_checkpoint_dir_is_named(tmp_path):
    """A checkpoint directory that is a symlink loop is reported as "a symbolic link loop"
    naming it, not as "[Errno 17] File exists"."""
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(CheckpointError, match="symbolic link loop") as info:
        CheckpointStore(loop).check_writable()
    assert "File exists" not in str(info.value) and str(loop) in str(info.value)
    with pytest.raises(CheckpointError, match="symbolic link loop"):
        CheckpointStore(loop).acquire_lock()


@pytest.mark.parametrize("field", ["offset", "length"])
def test_r5_f7_metadata_with_absurd_offsets_is_called_corrupt(clean_env, tmp_path, field):
    """A DCP `.metadata` (re-signed in the manifest) whose storage entry has an absurd offset or
    length is refused as CheckpointCorruptError naming the file and the field, not as a
    checkpoint "saved with another model"."""
    import devlayer
    from devlayer.train.checkpoint import CheckpointCorruptError
    from devlayer.train.sharded import MetadataUnpickler
    from tests.unit.test_sharded import _fit, _rewrite

    with devlayer.init(backend="cpu"):
        _fit(tmp_path)
        folder = tmp_path / "step-000000004"
        raw = (folder / "shards" / ".metadata").read_bytes()
        metadata = MetadataUnpickler(__import__("io").BytesIO(raw)).load()
        for info in metadata.storage_data.values():
            setattr(info, field, 1 << 60)
        _rewrite(folder, ".metadata", __import__("pickle").dumps(metadata))
        with pytest.raises(CheckpointCorruptError) as caught:
            _fit(tmp_path, max_steps=6)
    message = str(caught.value)
    assert str(folder / "shards" / ".metadata") in message and f"{field}=" in message
    assert "corrupt" in message and "another model" not in message
