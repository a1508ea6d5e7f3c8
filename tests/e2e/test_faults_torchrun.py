"""Faults under torchrun (issue 6: F1, F2, F3, F7): survive, resume exactly, or fail loudly."""

from __future__ import annotations

import subprocess

import pytest
import torch

from devlayer.train.checkpoint import CheckpointStore
from tests.helpers import ROOT, subprocess_env, torchrun

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]

WORKER = str(ROOT / "tests" / "e2e" / "worker_fault_train.py")


def _torchrun(tmp_path, name: str, *extra: str, restarts: int = 1):
    ckpt, out = tmp_path / f"{name}-ckpt", tmp_path / f"{name}.pt"
    cmd = torchrun(
        f"--max-restarts={restarts}",
        "--monitor-interval=0.2",
        WORKER,
        str(ckpt),
        str(out),
        *extra,
    )
    proc = subprocess.run(
        cmd, env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=280
    )
    return proc, ckpt, out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Final weights of an uninterrupted run with the same seed."""
    tmp = tmp_path_factory.mktemp("ref")
    proc, _, out = _torchrun(tmp, "ref")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def fsdp_reference(tmp_path_factory):
    """Final weights of an uninterrupted strategy="fsdp" run with the same seed."""
    tmp = tmp_path_factory.mktemp("fsdp-ref")
    proc, _, out = _torchrun(tmp, "ref", "--strategy", "fsdp")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("step", [5, 6], ids=["mid-epoch", "epoch-boundary"])
def test_f1_sigkill_rank1_restart_resumes_bitwise(tmp_path, reference, step):
    """torchrun --max-restarts=1, rank 1 SIGKILLed after step 5 (mid-epoch) or 6 (epoch
    boundary): the job restarts, resumes from a checkpoint, exits 0 and ends with weights
    bitwise equal to an uninterrupted run."""
    proc, _ckpt, out = _torchrun(tmp_path, "f1", "--kill-rank", "1", "--kill-at-step", str(step))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "resumed_from=" in proc.stdout and "resumed_from=None" not in proc.stdout
    assert _same(torch.load(out, weights_only=True), reference)


def test_f1_fsdp_sigkill_rank1_restart_resumes_bitwise_from_shards(tmp_path, fsdp_reference):
    """strategy="fsdp": the restart resumes from sharded checkpoints and ends bitwise equal."""
    proc, ckpt, out = _torchrun(
        tmp_path, "f1", "--kill-rank", "1", "--kill-at-step", "5", "--strategy", "fsdp"
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "resumed_from=" in proc.stdout and "step-000000004" in proc.stdout, proc.stdout
    assert _same(torch.load(out, weights_only=True), fsdp_reference)
    newest = CheckpointStore(ckpt).latest()
    assert newest is not None and (newest / "shards" / "__1_0.distcp").is_file()


def test_f3_fsdp_kill_after_the_shards_before_the_rename_keeps_previous(tmp_path, fsdp_reference):
    """Rank 0 dies after every rank wrote its shards but before the commit: not a checkpoint."""
    proc, ckpt, out = _torchrun(tmp_path, "f3", "--kill-in-write", "--strategy", "fsdp")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "step-000000002" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _same(torch.load(out, weights_only=True), fsdp_reference)
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".tmp-")]


def test_f2_no_restarts_fails_fast_naming_rank_and_signal(tmp_path):
    """torchrun --max-restarts=0, rank 1 SIGKILLed after step 5: the job exits non-zero, the error
    names local rank 1 and SIGKILL, and step 4's checkpoint is still the newest and verifies."""
    proc, ckpt, out = _torchrun(
        tmp_path, "f2", "--kill-rank", "1", "--kill-at-step", "5", restarts=0
    )
    assert proc.returncode != 0
    text = proc.stderr
    assert "local_rank: 1" in text and "SIGKILL" in text, text[-3000:]
    store = CheckpointStore(ckpt)
    newest = store.latest()
    assert newest is not None and newest.name == "step-000000004"
    store.verify(newest)
    assert not out.exists()


def test_f3_kill_during_checkpoint_write_keeps_previous_and_cleans_temp(tmp_path, reference):
    """Rank 0 is SIGKILLed between serializing its second checkpoint and the rename: the restart
    resumes from step 2, ends bitwise equal to an uninterrupted run, leaves no .tmp- folder, and
    every checkpoint left verifies."""
    proc, ckpt, out = _torchrun(tmp_path, "f3", "--kill-in-write")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "resumed_from=" in proc.stdout and "step-000000002" in proc.stdout, (
        proc.stdout[-3000:] + proc.stderr[-3000:]
    )
    assert _same(torch.load(out, weights_only=True), reference)
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".tmp-")]
    store = CheckpointStore(ckpt)
    for path in store.list():
        store.verify(path)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_c24_5_sigkill_of_the_background_writer_before_the_rename_resumes_bitwise(
    tmp_path, reference, fsdp_reference, strategy
):
    """C24-5: checkpoint_async=True: rank 0's background writer is SIGKILLed in its second
    save, after state.pt (and every rank's shards) are written and before the rename; the
    restart resumes from step 2, ends bitwise equal to an uninterrupted run, and leaves no
    .tmp- entry; every checkpoint left verifies."""
    proc, ckpt, out = _torchrun(
        tmp_path, "c24", "--kill-in-write", "--async", "--strategy", strategy
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "resumed_from=" in proc.stdout and "step-000000002" in proc.stdout, (
        proc.stdout[-3000:] + proc.stderr[-3000:]
    )
    expected = reference if strategy == "ddp" else fsdp_reference
    assert _same(torch.load(out, weights_only=True), expected)
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".tmp-")]
    store = CheckpointStore(ckpt)
    for path in store.list():
        store.verify(path)


def test_c24_6_sigkill_of_rank1_with_a_save_in_flight_resumes_bitwise(tmp_path, reference):
    """C24-6: checkpoint_async=True: rank 1 is SIGKILLed after step 5, while the save of
    step 4 may still be in flight on rank 0 (step 2's is committed: step 4's save waited for
    it); the restart resumes from the newest committed checkpoint and ends bitwise equal to
    an uninterrupted run, with no .tmp- entry."""
    proc, ckpt, out = _torchrun(
        tmp_path, "c24k", "--kill-rank", "1", "--kill-at-step", "5", "--async"
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "resumed_from=" in proc.stdout and "resumed_from=None" not in proc.stdout
    assert _same(torch.load(out, weights_only=True), reference)
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".tmp-")]


def test_f7_sigterm_stops_all_ranks_saves_and_exits_nonzero(tmp_path):
    """SIGTERM to the torchrun agent after step 3 (no restarts): the ranks stop with
    PreemptedError naming SIGTERM, the job exits non-zero without finishing, and a checkpoint
    of step 3 or later is written."""
    proc, ckpt, out = _torchrun(tmp_path, "f7", "--term-at-step", "3", restarts=0)
    assert proc.returncode != 0
    assert "PreemptedError" in proc.stderr
    assert "received signal SIGTERM" in proc.stderr
    assert not out.exists()
    newest = CheckpointStore(ckpt).latest()
    assert newest is not None and int(newest.name.split("-")[1]) >= 3
