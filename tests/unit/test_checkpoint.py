"""CheckpointStore: atomic saves, verification, safe loading, retention and RNG state."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import enum
import errno
import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

import devlayer
from devlayer.errors import InvalidArgumentError
from devlayer.train import checkpoint as ckpt
from devlayer.train import manifest as manifests
from devlayer.train.checkpoint import (
    FORMAT_VERSION,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointInUseError,
    CheckpointRunError,
    CheckpointStore,
    CheckpointVersionError,
    CheckpointWarning,
    CheckpointWorldSizeError,
    rng_state,
    set_rng_state,
    to_plain,
)
from tests.helpers import run_py, subprocess_env


def _save(store: CheckpointStore, step: int, **kw: Any) -> Path:
    payload = kw.pop("payload", {"w": torch.full((4,), float(step)), "step": step})
    kw.setdefault("epoch", 0)
    kw.setdefault("world_size", 1)
    return store.save(payload, step=step, **kw)


def _temps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".tmp-"))


def _names(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


class SimulatedKill(BaseException):
    """Stands for SIGKILL / power loss: not an Exception, so nothing may catch it."""


class Evil:
    """A pickle gadget: unpickling it runs code (here: writes a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


# -- writing ---------------------------------------------------------------------------


def test_save_layout_and_manifest(tmp_path):
    store = CheckpointStore(tmp_path / "ck")
    path = store.save(
        {"w": torch.arange(6.0)}, step=1234, epoch=3, world_size=4, extra={"loss": 0.5}
    )
    assert path == tmp_path / "ck" / "step-000001234"
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "state.pt"]
    assert _temps(tmp_path / "ck") == []
    m = json.loads((path / "manifest.json").read_text())
    data = (path / "state.pt").read_bytes()
    assert m["format_version"] == 2 and FORMAT_VERSION == 3  # 3 only for sharded ones
    assert m["run_id"] is None  # the store was given none
    body = {k: v for k, v in m.items() if k != "manifest_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    assert m["manifest_sha256"] == hashlib.sha256(canonical).hexdigest()
    assert (m["step"], m["epoch"], m["world_size"]) == (1234, 3, 4)
    assert m["torch_version"] == torch.__version__
    assert m["devlayer_version"] == devlayer.__version__
    assert datetime.fromisoformat(m["created"]).utcoffset().total_seconds() == 0
    assert m["sha256"] == hashlib.sha256(data).hexdigest()
    assert m["size"] == len(data)
    assert m["extra"] == {"loss": 0.5}
    assert store.verify(path) == m
    payload, manifest = store.load(path)
    assert torch.equal(payload["w"], torch.arange(6.0)) and manifest == m


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads fd paths from /proc")
def test_save_syncs_files_and_folders_before_and_after_the_rename(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path)
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append(("replace", f"{Path(src).name} -> {Path(dst).name}"))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    _save(store, 1)
    temp = Path(events[0][1]).parent
    assert temp.name.startswith(".tmp-step-000000001.new.")
    assert events == [
        ("fsync", str(temp / "state.pt")),
        ("fsync", str(temp / "manifest.json")),
        ("fsync", str(temp)),
        ("replace", f"{temp.name} -> step-000000001"),
        ("fsync", str(tmp_path)),
    ]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"keep": 0}, "keep=0"),
        ({"keep": True}, "keep=True"),
        ({"prefix": ".hidden"}, "prefix='.hidden'"),
        ({"prefix": "a/b"}, "prefix='a/b'"),
    ],
)
def test_store_arguments_are_validated(tmp_path, kwargs, match):
    with pytest.raises(InvalidArgumentError, match=re.escape(match)):
        CheckpointStore(tmp_path, **kwargs)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        ({"step": -1}, "step=-1"),
        ({"world_size": 0}, "world_size=0"),
        ({"epoch": 1.5}, "epoch=1.5"),
        ({"extra": {"t": torch.ones(1)}}, "cannot be stored as JSON"),
        ({"extra": {"loss": float("nan")}}, "cannot be stored as JSON"),
        ({"payload": [1, 2]}, "payload is a list"),
    ],
)
def test_save_arguments_are_validated(tmp_path, call, match):
    store = CheckpointStore(tmp_path)
    kw = {"payload": {}, "step": 1, "epoch": 0, "world_size": 1, **call}
    payload = kw.pop("payload")
    with pytest.raises(InvalidArgumentError, match=re.escape(match)):
        store.save(payload, **kw)
    assert list(tmp_path.iterdir()) == []


def test_keep_two_retention(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for step in range(1, 6):
        _save(store, step)
    assert _names(store.list()) == ["step-000000004", "step-000000005"]
    assert _temps(tmp_path) == []


def test_retention_never_deletes_the_checkpoint_just_written(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for step in (100, 200, 150):  # a run resumed from 100 after 200 was written
        _save(store, step)
    assert _names(store.list()) == ["step-000000150", "step-000000200"]
    single = CheckpointStore(tmp_path, keep=1)
    _save(single, 120)
    assert _names(single.list()) == ["step-000000120"]


def test_list_and_latest_order_by_step_and_ignore_other_entries(tmp_path):
    store = CheckpointStore(tmp_path, keep=10)
    for step in (20, 3, 1_000_000_000, 100):
        _save(store, step)
    # Things that are not checkpoints of this store.
    (tmp_path / ".tmp-step-999999999999.new.1.ab").mkdir()
    (tmp_path / "step-000000500").write_text("a file, not a folder")
    (tmp_path / "best-000000700").mkdir()
    (tmp_path / "step-abc").mkdir()
    assert _names(store.list()) == [
        "step-000000003",
        "step-000000020",
        "step-000000100",
        "step-1000000000",
    ]
    assert store.latest() == tmp_path / "step-1000000000"
    assert CheckpointStore(tmp_path / "missing").list() == []
    assert CheckpointStore(tmp_path / "missing").latest() is None


def test_saving_the_same_step_again_replaces_it(tmp_path):
    store = CheckpointStore(tmp_path)
    _save(store, 5, payload={"v": 1})
    _save(store, 5, payload={"v": 2})
    assert _names(store.list()) == ["step-000000005"]
    assert store.load()[0] == {"v": 2}
    assert _temps(tmp_path) == []


def test_payload_that_weights_only_refuses_is_rejected_at_save(tmp_path):
    store = CheckpointStore(tmp_path)
    marker = tmp_path / "marker"
    with pytest.raises(CheckpointError, match=r"builtins\.exec"):
        store.save({"obj": Evil(marker)}, step=1, epoch=0, world_size=1)
    with pytest.raises(CheckpointError, match="numpy"):
        store.save({"arr": np.zeros(3)}, step=1, epoch=0, world_size=1)
    assert list(tmp_path.iterdir()) == []
    assert not marker.exists()
    store.save(to_plain({"arr": np.zeros(3)}), step=1, epoch=0, world_size=1)
    assert torch.equal(store.load()[0]["arr"], torch.zeros(3, dtype=torch.float64))


# -- verification and resume -------------------------------------------------------------


def _truncate(p: Path) -> None:
    s = p / "state.pt"
    s.write_bytes(s.read_bytes()[: s.stat().st_size // 2])


def _empty_state(p: Path) -> None:
    (p / "state.pt").write_bytes(b"")


def _random_state(p: Path) -> None:
    s = p / "state.pt"
    s.write_bytes(random.Random(0).randbytes(s.stat().st_size))


def _delete_manifest(p: Path) -> None:
    (p / "manifest.json").unlink()


def _delete_state(p: Path) -> None:
    (p / "state.pt").unlink()


def _empty_manifest(p: Path) -> None:
    (p / "manifest.json").write_bytes(b"")


def _random_manifest(p: Path) -> None:
    (p / "manifest.json").write_bytes(random.Random(1).randbytes(300))


def _manifest_without_sha(p: Path) -> None:
    m = json.loads((p / "manifest.json").read_text())
    del m["sha256"]
    (p / "manifest.json").write_text(json.dumps(m))


CORRUPTIONS = {
    "truncated state": (_truncate, "truncated"),
    "empty state": (_empty_state, "is empty"),
    "random-bytes state": (_random_state, "sha256"),
    "deleted state": (_delete_state, "missing"),
    "deleted manifest": (_delete_manifest, "missing"),
    "empty manifest": (_empty_manifest, "is empty"),
    "random-bytes manifest": (_random_manifest, "not valid JSON"),
    "manifest without sha256": (_manifest_without_sha, "sha256=None"),
}


@pytest.mark.parametrize("damage", CORRUPTIONS.values(), ids=list(CORRUPTIONS))
def test_corrupt_newest_is_skipped_with_a_warning(tmp_path, damage):
    corrupt, reason = damage
    store = CheckpointStore(tmp_path)
    good = _save(store, 1)
    bad = _save(store, 2)
    corrupt(bad)
    with pytest.raises(CheckpointCorruptError, match=reason):
        store.verify(bad)
    with pytest.warns(CheckpointWarning, match=re.escape(str(bad))) as record:
        assert store.latest() == good
    assert any(reason in str(w.message) for w in record)
    with pytest.warns(CheckpointWarning):
        payload, manifest = store.load()
    assert payload["step"] == 1 and manifest["step"] == 1


def test_on_skip_callback_receives_path_and_error(tmp_path):
    store = CheckpointStore(tmp_path)
    good = _save(store, 1)
    bad = _save(store, 2)
    _truncate(bad)
    seen: list[tuple[Path, CheckpointError]] = []
    assert store.latest(on_skip=lambda p, e: seen.append((p, e))) == good
    assert [p for p, _ in seen] == [bad]
    assert isinstance(seen[0][1], CheckpointCorruptError)


def test_all_corrupt_is_an_error_not_a_fresh_start(tmp_path):
    store = CheckpointStore(tmp_path)
    paths = [_save(store, 1), _save(store, 2)]
    _truncate(paths[0])
    _delete_manifest(paths[1])
    with (
        pytest.warns(CheckpointWarning),
        pytest.raises(CheckpointCorruptError, match="none of the 2 checkpoints") as info,
    ):
        store.latest()
    assert all(str(p) in str(info.value) for p in paths)


def test_one_flipped_byte_is_a_sha256_mismatch(tmp_path):
    store = CheckpointStore(tmp_path)
    path = _save(store, 1, payload={"w": torch.zeros(1000)})
    state = path / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0x01
    state.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match="sha256") as info:
        store.verify(path)
    assert str(state) in str(info.value)
    with pytest.raises(CheckpointCorruptError, match="sha256"):
        store.load(path)


def test_newer_format_version_is_refused(tmp_path):
    store = CheckpointStore(tmp_path)
    path = _save(store, 1)
    m = json.loads((path / "manifest.json").read_text())
    m["format_version"] = FORMAT_VERSION + 1
    (path / "manifest.json").write_text(json.dumps(m))
    expected = f"newer devlayer ({devlayer.__version__}, format {FORMAT_VERSION + 1})"
    with pytest.raises(CheckpointVersionError, match=re.escape(expected)) as info:
        store.verify(path)
    assert "upgrade devlayer" in str(info.value)
    with pytest.raises(CheckpointVersionError, match="upgrade devlayer"):
        store.load(path)
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointVersionError):
        store.latest()


def test_world_size_change_is_refused_unless_allowed(tmp_path):
    store = CheckpointStore(tmp_path)
    _save(store, 1, world_size=2)
    with pytest.raises(CheckpointWorldSizeError) as info:
        store.load(expected_world_size=1)
    msg = str(info.value)
    assert "world_size=2" in msg and "world_size=1" in msg
    assert "allow_world_size_change=True" in msg
    payload, manifest = store.load(expected_world_size=1, allow_world_size_change=True)
    assert payload["step"] == 1 and manifest["world_size"] == 2
    assert store.load(expected_world_size=2)[1]["world_size"] == 2


@pytest.mark.parametrize("container", ["torch.save", "raw pickle"])
def test_malicious_pickle_with_correct_sha256_is_refused(tmp_path, container):
    marker = tmp_path / "pwned"
    control = tmp_path / "control"
    # Positive control: the gadget really runs code when fully unpickled.
    pickle.loads(pickle.dumps(Evil(control)))
    assert control.exists()

    store = CheckpointStore(tmp_path / "ck")
    path = _save(store, 1)
    state = path / "state.pt"
    if container == "torch.save":
        torch.save({"model": {"w": torch.ones(1)}, "x": Evil(marker)}, state)
    else:
        state.write_bytes(pickle.dumps({"x": Evil(marker)}, protocol=2))
    data = state.read_bytes()
    m = json.loads((path / "manifest.json").read_text())
    m.update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    m["manifest_sha256"] = manifests.digest(m)  # an attacker rewrites both
    (path / "manifest.json").write_text(json.dumps(m))

    assert store.verify(path)["sha256"] == m["sha256"]  # the bytes are as recorded
    with pytest.raises(CheckpointCorruptError, match="refuses to run code") as info:
        store.load(path)
    assert "weights_only=True" in str(info.value)
    if container == "torch.save":
        assert "builtins.exec" in str(info.value)
    assert not marker.exists()


def test_load_accepts_state_pt_and_rejects_other_paths(tmp_path):
    store = CheckpointStore(tmp_path / "ck")
    path = _save(store, 7)
    assert store.load(path / "state.pt")[0]["step"] == 7
    assert store.verify(path / "state.pt")["step"] == 7
    with pytest.raises(CheckpointError, match="is not a checkpoint folder"):
        store.load(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no checkpoint to load"):
        CheckpointStore(tmp_path / "empty").load()


# -- crashes and failing disks -------------------------------------------------------------


@pytest.mark.parametrize("crash", [SimulatedKill, RuntimeError])
def test_crash_before_rename_leaves_previous_checkpoint(tmp_path, monkeypatch, crash):
    store = CheckpointStore(tmp_path)
    first = _save(store, 1)
    seen: list[Path] = []

    def hook(temp: Path) -> None:
        seen.append(temp)
        assert sorted(p.name for p in temp.iterdir()) == ["manifest.json", "state.pt"]
        raise crash("killed between serialize and rename")

    monkeypatch.setattr(ckpt, "_before_commit", hook)
    with pytest.raises(crash):
        _save(store, 2)
    assert not (tmp_path / "step-000000002").exists()
    assert store.list() == [first]
    assert store.latest() == first
    assert _temps(tmp_path) == [seen[0].name]
    assert seen[0].name.startswith(".tmp-step-000000002.")
    assert store.cleanup_temp() == [seen[0]]
    assert _temps(tmp_path) == []
    assert store.load()[0]["step"] == 1


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_sigkill_before_rename_leaves_previous_checkpoint(tmp_path):
    code = textwrap.dedent(
        f"""
        import os, signal, torch
        from devlayer.train import checkpoint as ckpt
        store = ckpt.CheckpointStore({str(tmp_path)!r})
        store.save({{"step": 1}}, step=1, epoch=0, world_size=1)
        ckpt._before_commit = lambda temp: os.kill(os.getpid(), signal.SIGKILL)
        store.save({{"step": 2, "w": torch.ones(10)}}, step=2, epoch=0, world_size=1)
        print("not killed")
        """
    )
    proc = run_py(["-c", code], env=subprocess_env(), timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    store = CheckpointStore(tmp_path)
    assert _names(store.list()) == ["step-000000001"]
    assert store.load()[0] == {"step": 1}
    assert len(_temps(tmp_path)) == 1
    assert len(store.cleanup_temp()) == 1 and _temps(tmp_path) == []


def _enospc(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _assert_failed_cleanly(store: CheckpointStore, info: pytest.ExceptionInfo[Any]) -> None:
    assert str(store.directory) in str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    assert _temps(store.directory) == []
    assert _names(store.list()) == ["step-000000001"]
    assert store.load()[0]["step"] == 1


def test_full_disk_on_fsync_keeps_previous_checkpoint(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path)
    _save(store, 1)
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(CheckpointError, match="No space left on device") as info:
        _save(store, 2)
    monkeypatch.undo()
    assert info.value.__cause__.errno == errno.ENOSPC
    _assert_failed_cleanly(store, info)


def test_full_disk_during_torch_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path)
    _save(store, 1)
    real_save = torch.save

    def half_then_full(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        _enospc()

    monkeypatch.setattr(torch, "save", half_then_full)
    with pytest.raises(CheckpointError, match="No space left on device") as info:
        _save(store, 2)
    monkeypatch.undo()
    _assert_failed_cleanly(store, info)


def test_failed_rename_of_same_step_restores_the_old_copy(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path)
    _save(store, 1, payload={"step": 1, "v": "old"})
    real_replace = os.replace

    def no_permission(src: Any, dst: Any) -> None:
        if ".new." in str(src):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", no_permission)
    with pytest.raises(CheckpointError, match="Permission denied") as info:
        _save(store, 1, payload={"step": 1, "v": "new"})
    monkeypatch.undo()
    _assert_failed_cleanly(store, info)
    assert store.load()[0]["v"] == "old"


def test_cleanup_restores_a_copy_moved_aside_by_an_interrupted_resave(tmp_path):
    store = CheckpointStore(tmp_path)
    path = _save(store, 3)
    # A crash after this rename (by a process that has exited: pid 999999999 cannot exist).
    os.replace(path, tmp_path / ".tmp-step-000000003.old.999999999.ab")
    assert store.list() == []
    with pytest.warns(CheckpointWarning, match="restored"):
        assert store.cleanup_temp() == []
    assert store.list() == [path] and store.load()[0]["step"] == 3


# -- payloads, RNG state and exactness -------------------------------------------------------


def _draw() -> tuple[float, list[float], list[float]]:
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


def test_rng_state_round_trip_through_weights_only_load():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draw()
    np.random.randn()  # leaves a cached gaussian in NumPy's state
    state = rng_state()
    expected = _draw()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    random.seed(10)
    np.random.seed(20)
    torch.manual_seed(30)
    assert _draw() != expected
    set_rng_state(loaded)
    assert _draw() == expected
    set_rng_state(state)
    assert _draw() == expected


def test_rng_state_includes_the_accelerator_through_get_device_module(monkeypatch):
    calls: list[tuple[str, Any]] = []
    fake = SimpleNamespace(
        get_rng_state=lambda dev: calls.append(("get", dev)) or torch.arange(4, dtype=torch.uint8),
        set_rng_state=lambda t, dev: calls.append(("set", (t.tolist(), dev))),
    )
    dev = torch.device("cuda", 1)
    monkeypatch.setattr(devlayer, "is_initialized", lambda: True)
    monkeypatch.setattr(devlayer, "device", lambda: dev)
    monkeypatch.setattr(torch, "get_device_module", lambda kind: fake)
    state = rng_state()
    assert state["device"]["type"] == "cuda"
    assert state["device"]["state"].tolist() == [0, 1, 2, 3]
    set_rng_state(state)
    assert calls == [("get", dev), ("set", ([0, 1, 2, 3], dev))]
    monkeypatch.undo()
    with pytest.warns(CheckpointWarning, match="saved on a cuda device"):
        set_rng_state(state)  # on cpu now: skipped, with a warning


def test_trainer_payload_loads_with_weights_only(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu")
    for _ in range(2):
        opt.zero_grad()
        scaler.scale(model(torch.randn(8, 4)).pow(2).mean()).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
    payload = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scaler": scaler.state_dict(),
        "scheduler": sched.state_dict(),
        "epoch": 1,
        "step": 2,
        "rng": [rng_state(), rng_state()],
        "history": [{"epoch": 0, "loss": 0.5, "lr": 0.1}, {"epoch": 1, "loss": 0.25}],
    }
    assert payload["scaler"]["scale"] > 0 and opt.state_dict()["state"]
    store = CheckpointStore(tmp_path)
    store.save(payload, step=2, epoch=1, world_size=2)
    loaded, _ = store.load(expected_world_size=2)

    model2 = torch.nn.Linear(4, 2)
    opt2 = torch.optim.SGD(model2.parameters(), lr=1.0, momentum=0.0)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=7)
    scaler2 = torch.amp.GradScaler("cpu", init_scale=1.0)
    model2.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["optimizer"])
    sched2.load_state_dict(loaded["scheduler"])
    scaler2.load_state_dict(loaded["scaler"])
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    buf_a = opt.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(buf_a, opt2.state_dict()["state"][0]["momentum_buffer"])
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 0.025
    assert sched2.state_dict() == sched.state_dict()
    assert scaler2.state_dict() == scaler.state_dict()
    assert loaded["history"] == payload["history"] and loaded["epoch"] == 1
    set_rng_state(loaded["rng"][1])
    # to_plain leaves an already plain payload as it is.
    assert to_plain(payload)["scheduler"] == payload["scheduler"]


def _bits(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).tolist())


def test_cpu_tensors_load_bitwise_equal(tmp_path):
    special = torch.tensor([float("nan"), -0.0, float("inf"), -float("inf"), 1e-45, 3.14159])
    tensors = {
        "f32": special,
        "f64": special.double(),
        "f16": special.half(),
        "bf16": special.bfloat16(),
        "c64": torch.complex(special, special.flip(0)),
        "i64": torch.tensor([-(2**63), 2**63 - 1, 0]),
        "u8": torch.arange(256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "strided": torch.arange(24.0).reshape(4, 6)[:, ::2].t(),
    }
    store = CheckpointStore(tmp_path)
    store.save(tensors, step=1, epoch=0, world_size=1)
    loaded, _ = store.load(map_location="cpu")
    for name, t in tensors.items():
        got = loaded[name]
        assert got.device.type == "cpu" and got.dtype == t.dtype and got.shape == t.shape, name
        assert _bits(got) == _bits(t), name


@pytest.mark.gpu
def test_cuda_tensor_loads_on_cpu_bitwise_equal(tmp_path):
    t = torch.randn(1000, device="cuda").bfloat16()
    store = CheckpointStore(tmp_path)
    store.save({"t": t}, step=1, epoch=0, world_size=1)
    loaded, _ = store.load(map_location="cpu")
    assert loaded["t"].device.type == "cpu"
    assert _bits(loaded["t"]) == _bits(t.cpu())


class Color(enum.Enum):
    RED = "red"


Point = collections.namedtuple("Point", "x y")


@dataclasses.dataclass
class Stats:
    loss: float
    seen: int


def test_to_plain_makes_values_weights_only_safe(tmp_path):
    sd = torch.nn.Linear(2, 1).state_dict()
    value = {
        "color": Color.RED,
        "np_scalar": np.float32(1.5),
        "np_int": np.int64(7),
        "np_array": np.arange(3),
        "point": Point(1, 2),
        "stats": Stats(0.5, 10),
        "path": Path("a") / "b",
        "sd": sd,
        "set": {1, 2},
    }
    plain = to_plain(value)
    assert plain["color"] == "red" and type(plain["np_scalar"]) is float
    assert type(plain["np_int"]) is int and type(plain["point"]) is tuple
    assert plain["stats"] == {"loss": 0.5, "seen": 10}
    assert plain["path"] == str(Path("a") / "b")
    assert torch.equal(plain["np_array"], torch.arange(3))
    assert plain["sd"]._metadata == sd._metadata
    buf = io.BytesIO()
    torch.save(plain, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["point"] == (1, 2)
    with pytest.raises(InvalidArgumentError, match=r"obj\['bad'\]\[0\] is a builtins\.object"):
        to_plain({"bad": [object()]})


# -- round 2 (issue 14): the folder lock, run identity, bounded reads, full disks ------------


def _child(code: str) -> subprocess.Popen[str]:
    """A Python child running ``code`` (stdin kept open: closing it lets the child end)."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )


HOLD_LOCK = """
    import sys
    from devlayer.train.checkpoint import CheckpointStore
    store = CheckpointStore(sys.argv[1] if len(sys.argv) > 1 else {path!r})
    store.acquire_lock()
    print("LOCKED", flush=True)
    sys.stdin.read()
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX record locks")
@pytest.mark.timeout(120)
def test_r2_2_lock_held_by_another_process_names_it(tmp_path):
    """While another live process holds the folder lock, acquire_lock() raises
    CheckpointInUseError naming its pid, host and the fix, cleanup_temp() removes nothing, and
    the lock is free again once the holder exits."""
    holder = _child(HOLD_LOCK.format(path=str(tmp_path)))
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "LOCKED\n"
        with pytest.raises(CheckpointInUseError) as info:
            CheckpointStore(tmp_path).acquire_lock()
        message = str(info.value)
        assert f"pid {holder.pid} on host {socket.gethostname()!r}" in message
        assert str(tmp_path) in message and "another checkpoint directory" in message
        # cleanup_temp() still works beside it, but only on provably dead writers' entries.
        assert CheckpointStore(tmp_path).cleanup_temp() == []
    finally:
        holder.communicate(timeout=60)
    with CheckpointStore(tmp_path).lock() as store:  # released with its process
        assert store.locked


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
@pytest.mark.timeout(120)
def test_r2_2_lock_of_a_killed_process_is_recognised_as_stale(tmp_path):
    """A lock holder killed with SIGKILL leaves its lock file but not the lock: the next store
    takes the lock at once and records its own pid, so a crashed job never blocks the next."""
    holder = _child(HOLD_LOCK.format(path=str(tmp_path)))
    assert holder.stdout is not None and holder.stdout.readline() == "LOCKED\n"
    holder.kill()
    holder.communicate(timeout=60)
    recorded = json.loads((tmp_path / ".lock-step").read_text())
    assert recorded["pid"] == holder.pid  # the file stays; the kernel dropped the lock
    with CheckpointStore(tmp_path).lock():
        assert json.loads((tmp_path / ".lock-step").read_text())["pid"] == os.getpid()


def test_r2_2_one_lock_per_folder_within_a_process_too(tmp_path):
    """A second store on a folder this process already locked raises CheckpointInUseError (POSIX
    locks alone would let it through), the refusal keeps the first lock held, and another prefix
    gets its own lock."""
    first = CheckpointStore(tmp_path)
    with first.lock():
        with pytest.raises(CheckpointInUseError, match="already in use by this process"):
            CheckpointStore(tmp_path).acquire_lock()
        assert first.locked  # the refused attempt did not drop the POSIX lock
    CheckpointStore(tmp_path, prefix="best").acquire_lock()  # another prefix: its own lock


@pytest.mark.timeout(120)
def test_r2_2_cleanup_never_removes_a_live_process_temp_files(tmp_path):
    """cleanup_temp() removes a temp folder whose writer pid is dead but keeps one whose writer on
    this host is alive, until that writer exits: another job's save in progress is never lost."""
    store = CheckpointStore(tmp_path)
    _save(store, 1)
    tag = ckpt.host_tag()
    writer = _child("import sys; sys.stdin.read()")  # a live process of this host
    try:
        live = tmp_path / f".tmp-step-000000002.new.{writer.pid}.{tag}.abcd1234"
        live.mkdir()
        (live / "state.pt").write_bytes(b"half written")
        dead = tmp_path / f".tmp-step-000000003.new.999999999.{tag}.abcd1234"
        dead.mkdir()
        assert store.cleanup_temp() == [dead]
        assert live.is_dir(), "another job's save in progress must survive cleanup"
    finally:
        writer.communicate(timeout=60)
    assert store.cleanup_temp() == [live]  # its writer has exited now


def test_r2_2_folder_name_must_match_the_manifest_step(tmp_path):
    """A folder named step-99999999999 holding step 32 is skipped by latest() with a warning, and
    pruning ranks only folders whose manifest matches their name, so it keeps steps 32 and 34."""
    store = CheckpointStore(tmp_path, keep=2)
    for step in (30, 32):
        _save(store, step)
    bogus = tmp_path / "step-99999999999"
    shutil.copytree(tmp_path / "step-000000032", bogus)
    with pytest.warns(CheckpointWarning, match="named for step 99999999999.*says step 32"):
        assert store.latest() == tmp_path / "step-000000032"
    with pytest.warns(CheckpointWarning, match="left .*step-99999999999 alone"):
        _save(store, 34)
    # Pruning ranked the real steps, not the misnamed folder: 32 and 34 are kept.
    assert _names(store.list()) == ["step-000000032", "step-000000034", "step-99999999999"]


def test_r2_2_latest_refuses_a_folder_holding_two_runs(tmp_path):
    """latest() on a folder holding checkpoints of two run ids raises CheckpointRunError naming the
    folder and each run with its steps, instead of resuming whichever is newest; a run_id with
    spaces or slashes is refused."""
    for step in (10, 20):
        _save(CheckpointStore(tmp_path, keep=5, run_id="run-a"), step)
    _save(CheckpointStore(tmp_path, keep=5, run_id="run-b"), 4)
    store = CheckpointStore(tmp_path)
    assert store.runs() == {"run-a": [10, 20], "run-b": [4]}
    with pytest.raises(CheckpointRunError) as info:
        store.latest()
    assert "run 'run-a' (steps 10, 20)" in str(info.value)
    assert "run 'run-b' (step 4)" in str(info.value)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(InvalidArgumentError, match="run_id"):
        CheckpointStore(tmp_path, run_id="no spaces/slashes")


def test_r2_10_hand_edited_manifest_is_refused(tmp_path):
    """A step folder renamed with its manifest's step edited to match is refused by verify() as
    "changed after it was written", because the manifest's own sha256 no longer matches."""
    store = CheckpointStore(tmp_path)
    _save(store, 5)
    path = tmp_path / "step-000000007"
    os.replace(tmp_path / "step-000000005", path)  # a consistent-looking hand edit
    m = json.loads((path / "manifest.json").read_text())
    m["step"] = 7
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointCorruptError, match="was changed after it was written"):
        store.verify(path)


def test_r2_10_symlinked_step_folders_leave_no_temp_links(tmp_path):
    """When a step folder is a symlink, a same-step re-save and pruning remove only the link,
    leave no .tmp- link behind and never delete the folder it points to."""
    store = CheckpointStore(tmp_path / "ck", keep=1)

    def link_step_1(target: Path) -> None:  # a step folder kept on another disk, say
        os.replace(store.path_for(1), target)
        store.path_for(1).symlink_to(target)

    _save(store, 1)
    link_step_1(tmp_path / "a")
    _save(store, 1)  # a re-save moves the link aside, then removes the link
    assert _temps(tmp_path / "ck") == [] and not store.path_for(1).is_symlink()
    link_step_1(tmp_path / "b")
    _save(store, 2)  # pruning step 1 removes the link
    assert _temps(tmp_path / "ck") == [] and _names(store.list()) == ["step-000000002"]
    for target in ("a", "b"):  # what the links pointed to is never deleted through them
        assert (tmp_path / target / "state.pt").is_file()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes")
def test_r2_10_private_store_creates_owner_only_checkpoints(tmp_path):
    """CheckpointStore(private=True) creates folders 0700 and files 0600 even under umask 022,
    while a default store follows the umask (files 0644)."""
    old = os.umask(0o022)
    try:
        path = _save(CheckpointStore(tmp_path / "private", private=True), 1)
        shared = _save(CheckpointStore(tmp_path / "shared"), 1)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "private").stat().st_mode & 0o777 == 0o700
    for name in ("state.pt", "manifest.json"):
        assert (path / name).stat().st_mode & 0o777 == 0o600
        assert (shared / name).stat().st_mode & 0o777 == 0o644  # the umask's default


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_r2_4_full_disk_inside_torch_save_is_reported_as_such(tmp_path, monkeypatch):
    """ENOSPC on every write inside the real torch.save (which turns it into a RuntimeError) is
    reported as "No space left on device ... disk is full", not "could not serialize", with no
    temp folder left and the previous checkpoint kept."""
    store = CheckpointStore(tmp_path)
    _save(store, 1)
    real_init = ckpt.HashingWriter.__init__
    with contextlib.ExitStack() as files:

        def onto_a_full_disk(self: Any, file: Any) -> None:
            # every write: ENOSPC from the kernel
            real_init(self, files.enter_context(open("/dev/full", "wb")))

        monkeypatch.setattr(ckpt.HashingWriter, "__init__", onto_a_full_disk)
        # The real torch.save swallows the OSError and fails with its own RuntimeError
        # ("unexpected pos ..."); the report must still say the disk is full.
        with pytest.raises(CheckpointError, match="No space left on device") as info:
            _save(store, 2, payload={"w": torch.zeros(200_000)})
        monkeypatch.undo()
        with contextlib.suppress(OSError):
            files.close()
    assert "could not serialize" not in str(info.value) and "disk is full" in str(info.value)
    assert info.value.__cause__.errno == errno.ENOSPC
    assert _temps(tmp_path) == [] and _names(store.list()) == ["step-000000001"]


ENOSPC_JOB = """
    import sys, torch
    from devlayer.train.checkpoint import CheckpointStore, CheckpointError
    try:
        CheckpointStore(sys.argv[1]).save({"w": torch.zeros(200_000)}, step=1, epoch=0,
                                          world_size=1)
    except CheckpointError as exc:
        print("ERROR", exc)
"""


@pytest.mark.timeout(120)
def test_r2_4_real_full_disk_says_no_space_left(tmp_path):
    """Saving onto a real 64 KiB tmpfs (in a mount namespace; skipped without one) reports "No
    space left on device", not "could not serialize"."""
    if shutil.which("unshare") is None or not sys.platform.startswith("linux"):
        pytest.skip("needs unshare (Linux user and mount namespaces) for a tiny tmpfs")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(ENOSPC_JOB))
    proc = subprocess.run(
        [
            "unshare",
            "-rm",
            "sh",
            "-c",
            f'mount -t tmpfs -o size=64k none "{mnt}" && "{sys.executable}" "{script}" "{mnt}/ck"',
        ],
        capture_output=True,
        text=True,
        timeout=100,
        env=subprocess_env(),
    )
    if "ERROR" not in proc.stdout and proc.returncode != 0:
        pytest.skip(f"no mount namespace here: {proc.stderr.strip()[-300:]}")
    assert "No space left on device" in proc.stdout, proc.stdout + proc.stderr
    assert "could not serialize" not in proc.stdout


def _manifest_replaced_by(kind: str, path: Path) -> None:
    manifest = path / "manifest.json"
    manifest.unlink()
    if kind == "fifo":
        os.mkfifo(manifest)
    elif kind == "/dev/zero":
        manifest.symlink_to("/dev/zero")
    else:  # a regular file far above the cap
        with open(manifest, "wb") as f:
            f.truncate(manifests.MANIFEST_LIMIT * 64)


LATEST_JOB = """
    import resource, sys, warnings
    from devlayer.train.checkpoint import CheckpointStore
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (used + (512 << 20), hard))  # no memory blow-up
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        print("LATEST", CheckpointStore(sys.argv[1]).latest().name)
    print("WARNED", " | ".join(str(w.message) for w in seen))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="FIFOs, /dev/zero, /proc")
@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "huge"])
@pytest.mark.timeout(120)
def test_r2_5_manifest_that_is_no_small_regular_file_is_skipped(tmp_path, kind):
    """A manifest.json that is a FIFO, a symlink to /dev/zero or an oversized file is skipped by
    latest() with a warning saying what it is, and the previous step is used, without blocking
    (timeout) or exhausting memory (child under a memory limit)."""
    store = CheckpointStore(tmp_path / "ck")
    _save(store, 1)
    _manifest_replaced_by(kind, _save(store, 2))
    script = tmp_path / "latest.py"
    script.write_text(textwrap.dedent(LATEST_JOB))
    try:
        proc = run_py([str(script), str(tmp_path / "ck")], timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail(f"resume blocked on a manifest that is {kind}")
    assert "LATEST step-000000001" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    expected = {
        "fifo": "is a FIFO (named pipe), expected a regular file",
        "/dev/zero": "is a character device, expected a regular file",
        "huge": f"is larger than {manifests.MANIFEST_LIMIT} bytes",
    }[kind]
    assert expected in proc.stdout


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
@pytest.mark.timeout(60)
def test_r2_5_state_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    """A state.pt that is a FIFO is refused by verify() with CheckpointCorruptError saying so,
    instead of blocking forever on opening it."""
    store = CheckpointStore(tmp_path)
    path = _save(store, 1)
    (path / "state.pt").unlink()
    os.mkfifo(path / "state.pt")
    with pytest.raises(CheckpointCorruptError, match="is a FIFO"):
        store.verify(path)
