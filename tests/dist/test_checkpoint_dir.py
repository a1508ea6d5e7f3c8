"""The Trainer's checkpoint folder under real processes (issue 14 items 2, 3, 5, 10).

One job per folder (a lock held by the writing rank, named in the second job's error and
gone with a killed holder), run identity (a fresh run never writes beside another run),
an unwritable folder found before the first step on every rank, SIGTERM effective during
resume, and a model that does not fit the checkpoint named as such.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import devlayer
from devlayer.train.checkpoint import (
    CheckpointError,
    CheckpointRunError,
    CheckpointStore,
)
from tests.dist.trainer_worker import make_data, train
from tests.helpers import PY, ROOT, rank_results, subprocess_env

pytestmark = [pytest.mark.dist, pytest.mark.timeout(600)]


def _job_cmd(ckpt: Path, *extra: str) -> list[str]:
    return [PY, "-m", "tests.dist.ckpt_job", str(ckpt), *extra]


def _popen(cmd: list[str], stderr: int = subprocess.STDOUT) -> subprocess.Popen[str]:
    """Start a job in its own session: _stop() can then kill it and every rank it spawned."""
    return subprocess.Popen(
        cmd,
        env=subprocess_env(),
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=stderr,
        start_new_session=True,
    )


def _run(cmd: list[str], timeout: float = 400) -> subprocess.CompletedProcess[str]:
    """Run a job to its end; whatever happens (timeout, a failed assertion), none of its
    processes outlives the call (its ranks turn SIGTERM into a stop flag, so kill them)."""
    proc = _popen(cmd, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        _stop(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _run_job(ckpt: Path, *extra: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    return _run(_job_cmd(ckpt, *extra), timeout=timeout)


def _wait_for_line(proc: subprocess.Popen[str], prefix: str) -> str:
    """Read ``proc``'s stdout until a line starts with ``prefix`` (pytest's timeout guards)."""
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(prefix):
            return line
    raise AssertionError(f"the job ended without printing {prefix!r}:\n{''.join(seen)[-3000:]}")


def _stop(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the job's whole process group (its spawned ranks too), then reap the job."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the group outlives its leader: kill it anyway
    proc.wait(timeout=60)


def _dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie: not running
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.timeout(120)
def test_stop_kills_the_ranks_that_outlive_their_job(tmp_path):
    """_stop() kills a job's children too, also one that ignores SIGTERM and whose parent has
    already exited: the cleanup of every test here leaves no rank of a failed job behind."""
    child = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); signal.pause()"
    job = (
        "import subprocess, sys; "
        f"p = subprocess.Popen([sys.executable, '-c', {child!r}]); "
        "print('CHILD', p.pid, flush=True)"
    )
    proc = _popen([PY, "-c", job])
    pid = int(_wait_for_line(proc, "CHILD").split()[1])
    proc.wait(timeout=60)  # the job is gone, its child (a "rank") lives on
    assert not _dead(pid)
    _stop(proc)
    while not _dead(pid):  # SIGKILL is delivered asynchronously; pytest's timeout guards
        time.sleep(0.05)


def test_r2_2_second_job_in_the_folder_is_refused_naming_the_holder(tmp_path):
    """Two jobs in one folder: the second fails at once (every rank) naming the first, which
    survives with all its checkpoints."""
    ckpt, release = tmp_path / "ckpt", tmp_path / "release"
    first = _popen(
        _job_cmd(ckpt, "--nprocs", "2", "--hold-at-step", "3", "--hold-until", str(release))
    )
    try:
        holder_pid = int(_wait_for_line(first, "HOLDING").split("pid=")[1])
        # The first job (2 ranks, rank 0 writes) is mid-run, a checkpoint of step 2 saved.
        # A second 2-rank job in the same folder, as a scheduler might start by mistake.
        second = _run_job(ckpt, "--nprocs", "2", "--resume", "auto")
        results = rank_results(second.stdout)
        assert len(results) == 2, second.stdout[-3000:] + second.stderr[-3000:]
        for result in results:
            assert result["error_type"] == "CheckpointInUseError", second.stdout[-3000:]
            assert f"pid {holder_pid} on host {socket.gethostname()!r}" in result["error"]
            assert str(ckpt) in result["error"]
            assert "another checkpoint directory" in result["error"]
            assert result["steps"] == 0
        assert results[0]["error"] == results[1]["error"]
        release.touch()
        out, _ = first.communicate(timeout=300)
    finally:
        _stop(first)
    assert first.returncode == 0, out[-3000:]
    results = rank_results(out)
    assert [r["error"] for r in results] == [None, None], out[-3000:]
    store = CheckpointStore(ckpt)
    assert [p.name for p in store.list()] == ["step-000000010", "step-000000012"]
    for path in store.list():
        store.verify(path)
    assert len(store.runs()) == 1
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".tmp-")]


def test_r2_2_killed_holder_leaves_no_stale_lock(tmp_path, clean_env):
    """SIGKILL of the lock holder: the kernel drops the lock, the next job resumes."""
    ckpt = tmp_path / "ckpt"
    killed = _run_job(ckpt, "--kill-at-step", "3")
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    holder = json.loads((ckpt / ".lock-step").read_text())
    assert holder["host"] == socket.gethostname() and holder["pid"] > 0  # a dead process
    with devlayer.init(backend="cpu"):
        result = train(checkpoint_dir=str(ckpt), checkpoint_every=2, max_epochs=2, val=False)
    assert result["resumed_from"] is not None and result["resumed_from"].endswith("-000000002")
    assert result["history"][-1]["global_step"] == 12


def test_r2_2_fresh_run_never_writes_beside_another_run(tmp_path, clean_env):
    """resume=None in a folder of another run is refused; resume='auto' keeps the run id."""
    ckpt = tmp_path / "ckpt"
    kw = {"checkpoint_dir": str(ckpt), "checkpoint_every": 2, "val": False}
    with devlayer.init(backend="cpu"):
        train(max_epochs=1, resume=None, **kw)
        with pytest.raises(CheckpointRunError) as info:
            train(max_epochs=1, resume=None, **kw)
        (run,) = CheckpointStore(ckpt).runs()
        message = str(info.value)
        assert str(ckpt) in message and run in message
        assert "new checkpoint_dir" in message and "resume='auto'" in message
        assert CheckpointStore(ckpt).runs() == {run: [4, 6]}  # untouched
        result = train(max_epochs=2, resume="auto", **kw)
    assert result["resumed_from"].endswith("step-000000006")
    assert CheckpointStore(ckpt).runs() == {run: [10, 12]}  # the same run, continued


def _read_only_mount_works() -> bool:
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs none /mnt && mount -o remount,ro /mnt"],
        capture_output=True,
        timeout=30,
    )
    return probe.returncode == 0


def test_r2_3_unwritable_folder_fails_every_rank_before_the_first_step(tmp_path):
    """A read-only checkpoint_dir is found before training, on both ranks alike."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    cmd = _job_cmd(ckpt, "--nprocs", "2")
    expected = "Read-only file system"
    if _read_only_mount_works():
        # A real read-only mount (root ignores permission bits, so chmod would not do).
        script = f'mount --bind "{ckpt}" "{ckpt}" && mount -o remount,bind,ro "{ckpt}" && '
        cmd = ["unshare", "-rm", "sh", "-c", script + " ".join(f'"{c}"' for c in cmd)]
    else:  # no mount namespaces here: a path below a regular file cannot be created either
        (tmp_path / "file").write_text("not a folder")
        cmd = _job_cmd(tmp_path / "file" / "ckpt", "--nprocs", "2")
        expected = "Not a directory"
    proc = _run(cmd)
    results = rank_results(proc.stdout)
    assert len(results) == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = results
    assert r0["error_type"] == r1["error_type"] == "CheckpointError"
    assert r0["error"] == r1["error"], "every rank must raise rank 0's error"
    assert "is not usable" in r0["error"] and expected in r0["error"]
    assert "no work is lost" in r0["error"]
    assert r0["steps"] == r1["steps"] == 0, "the check must come before the first step"


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM and FIFOs are POSIX")
def test_r2_5_sigterm_during_resume_ends_the_job(tmp_path):
    """A resume stuck on the file system still ends on SIGTERM (not only on SIGKILL)."""
    ckpt, fifo = tmp_path / "ckpt", tmp_path / "hung"
    CheckpointStore(ckpt).save({"w": torch.ones(1)}, step=2, epoch=0, world_size=1)
    os.mkfifo(fifo)
    proc = _popen(_job_cmd(ckpt, "--block-resume-on", str(fifo)))
    try:
        _wait_for_line(proc, "RESUMING")
        time.sleep(0.5)  # let it enter the blocking open (not a timing assertion)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        _stop(proc)
    (result,) = rank_results(out)
    assert result["error_type"] == "PreemptedError", out[-3000:]
    assert "received SIGTERM while" in result["error"] and str(ckpt) in result["error"]


def test_r2_10_model_that_does_not_fit_names_checkpoint_and_shapes(tmp_path, clean_env):
    """A model-shape mismatch on resume is a CheckpointError with the path and the shapes."""
    ckpt = tmp_path / "ckpt"
    with devlayer.init(backend="cpu"):
        train(max_epochs=1, checkpoint_dir=str(ckpt), checkpoint_every=2, val=False)
        torch.manual_seed(0)
        wide = torch.nn.Sequential(
            torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Dropout(0.1), torch.nn.Linear(32, 1)
        )
        trainer = devlayer.Trainer(
            wide,
            torch.optim.SGD(wide.parameters(), lr=0.05),
            torch.nn.functional.mse_loss,
            batch_size=16,
            checkpoint_dir=ckpt,
            progress=False,
            num_workers=0,
        )
        with pytest.raises(CheckpointError) as info:
            trainer.fit(make_data())
    message = str(info.value)
    assert str(ckpt / "step-000000006") in message
    assert "0.weight: saved (16, 4), this model (32, 4)" in message
    assert "build the same model" in message
    # The lock went with the failed fit: the folder is usable again in this process.
    with CheckpointStore(ckpt).lock():
        pass


def test_r2_10_manifest_step_is_cross_checked_with_the_trainer_state(tmp_path, clean_env):
    """A manifest re-signed by hand with another step is refused against state.pt."""
    from devlayer.train import manifest as manifests

    ckpt = tmp_path / "ckpt"
    with devlayer.init(backend="cpu"):
        train(max_epochs=1, checkpoint_dir=str(ckpt), checkpoint_every=2, val=False)
        forged = ckpt / "step-000000008"
        os.replace(ckpt / "step-000000006", forged)
        manifest = json.loads((forged / "manifest.json").read_text())
        manifest["step"] = 8
        manifest["manifest_sha256"] = manifests.digest(manifest)
        (forged / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(CheckpointError, match="saved trainer state is at step 6"):
            train(max_epochs=2, checkpoint_dir=str(ckpt), checkpoint_every=2, val=False)


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks")
def test_r5_f1_planted_lock_symlink_fails_every_rank_and_spares_its_target(tmp_path):
    """A `.lock-step` symlink planted in the checkpoint folder of a 2-rank job: every rank
    raises rank 0's CheckpointError ("symbolic link") before the first step, the job does not
    succeed, and the file the link points to keeps its content."""
    ckpt, victim = tmp_path / "ckpt", tmp_path / "victim"
    ckpt.mkdir()
    victim.write_text("precious\n")
    (ckpt / ".lock-step").symlink_to(victim)
    proc = _run_job(ckpt, "--nprocs", "2")
    results = rank_results(proc.stdout)
    assert len(results) == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    for result in results:
        assert result["error_type"] == "CheckpointError", result
        assert "symbolic link" in result["error"] and result["steps"] == 0
    assert results[0]["error"] == results[1]["error"]
    assert victim.read_text() == "precious\n"
    assert CheckpointStore(ckpt).list() == []
