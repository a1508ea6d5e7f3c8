"""The benchmark scripts still run end to end (tiny settings; no timing is asserted).

Speed lives in ``python -m benchmarks.run``; these tests only keep the scripts working as
the library changes: every implementation trains, the ranks agree on the weights, and the
records the runner reads are written.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ROOT, subprocess_env, torchrun

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(240)]


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=200, env=subprocess_env(), cwd=ROOT
    )


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_training_benchmark_two_ranks(tmp_path: Path) -> None:
    out = tmp_path / "training.jsonl"
    impls = "hand-written DDP loop,devlayer.Trainer"
    argv = torchrun(
        "benchmarks/training.py",
        *("--model", "cnn", "--samples", "512", "--epochs", "2", "--repeats", "1"),
        *("--impls", impls, "--json", str(out)),
    )
    proc = _run(argv)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = [r for r in _records(out) if r["type"] == "result"]
    assert {r["impl"] for r in results} == set(impls.split(","))
    assert all(r["world_size"] == 2 and r["samples_per_s"] > 0 for r in results)
    # Same initial weights, data order and global batch: the same final loss.
    assert len({round(r["final_loss_rank0"], 6) for r in results}) == 1
    (memory,) = [r for r in _records(out) if r["type"] == "memory"]
    assert len(memory["peak_rss_mb_per_rank"]) == 2
    assert "| devlayer.Trainer |" in proc.stdout


def test_collectives_benchmark_two_ranks(tmp_path: Path) -> None:
    out = tmp_path / "collectives.jsonl"
    argv = torchrun(
        "benchmarks/collectives.py",
        *("--quick", "--sections", "all_reduce", "--repeats", "1", "--rounds", "1"),
        *("--json", str(out)),
    )
    proc = _run(argv)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = [r for r in _records(out) if r.get("type") == "result"]
    assert {r["impl"] for r in results} == {
        "raw",
        "devlayer",
        "devlayer_checked",
        "devlayer_unchecked",
        "ledger_on",
        "ledger_off",
    }
    assert {r["section"] for r in results} == {"all_reduce"}
    assert "### all_reduce" in proc.stdout


def test_ledger_benchmark_two_ranks_prints_its_five_measurements() -> None:
    argv = torchrun(
        "benchmarks/ledger.py",
        *("--runs", "1", "--repeats", "1", "--rounds", "1", "--block-s", "0.002"),
        *("--calls", "40", "--blocks", "1", "--chunks", "2", "--sizes", "4"),
        *("--ddp-steps", "3"),
    )
    proc = _run(argv)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for title in (
        "in situ and alone",
        "CPU time per call",
        "Paired wall time",
        "call by call",
        "DDP steps with the recording comm hook",
    ):
        assert title in proc.stdout
    assert "| none_again |" in proc.stdout
    assert "| now: depth hint, f_lasti |" in proc.stdout and "| a Python float (1.5) |" in (
        proc.stdout
    )


def test_ledger_benchmark_narrow_run_keeps_only_the_chosen_arms() -> None:
    """``--arms`` and ``--no-float`` (measurement 4 at one size, for many chunks): the table
    has "off" and the chosen arms only, no Python float row, and each row is printed as soon
    as it is measured (stderr), so a run cut short keeps what it measured."""
    argv = torchrun(
        "benchmarks/ledger.py",
        *("--skip", "1,2,3,5", "--calls", "40", "--chunks", "2", "--sizes", "4"),
        *("--no-float", "--arms", "ledger_on,spin"),
    )
    proc = _run(argv)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "call by call" in proc.stdout and "a Python float" not in proc.stdout
    assert "(ledger_on, ledger_off, spin;" in proc.stdout
    assert "A/A control" not in proc.stdout and "call-site search only" not in proc.stdout
    assert "measurement 4, 4 B: ['4 B'" in proc.stderr
    bad = _run(torchrun("benchmarks/ledger.py", "--skip", "1,2,3,5", "--arms", "nope"))
    assert bad.returncode != 0 and "--arms: unknown ['nope']" in bad.stdout + bad.stderr


def test_fsdp_benchmark_two_ranks_holds_half_the_state(tmp_path: Path) -> None:
    out = tmp_path / "fsdp.jsonl"
    for strategy in ("ddp", "fsdp"):
        argv = torchrun("benchmarks/fsdp.py", "--strategy", strategy, "--quick")
        proc = _run([*argv, "--json", str(out)])
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    records = _records(out)
    ddp = [r for r in records if r["strategy"] == "ddp"]
    fsdp = [r for r in records if r["strategy"] == "fsdp"]
    assert len(ddp) == len(fsdp) == 2
    assert [r["sharded"] for r in fsdp] == [True, True] and not ddp[0]["sharded"]
    # the same model and data: the same losses; each FSDP rank holds half the state
    assert fsdp[0]["losses"] == pytest.approx(ddp[0]["losses"], rel=1e-4)
    assert max(r["total_mb"] for r in fsdp) <= 0.55 * ddp[0]["total_mb"]

    from benchmarks.run import fsdp_rows

    rows = {row[0]: row for row in fsdp_rows(records)}
    assert rows["fsdp"][1] == "yes" and rows["fsdp"][6].endswith("x")


@pytest.mark.timeout(500)
def test_checkpoints_step_of_the_suite_runs_sync_and_async(tmp_path: Path) -> None:
    """``python -m benchmarks.run --quick --only checkpoints`` runs
    benchmarks/async_checkpoint.py at world 2: no saves, sync and async DDP and FSDP each
    train on both ranks, time their periodic saves and write checkpoints; the thread and
    process writers each write; summary.md holds both tables."""
    import sys

    argv = [sys.executable, "-m", "benchmarks.run", "--quick", "--only", "checkpoints"]
    proc = subprocess.run(
        [*argv, "--no-plots", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=480,
        env=subprocess_env(),
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (results,) = tmp_path.iterdir()
    records = _records(results / "checkpoints.jsonl")
    modes = ("none", "sync-ddp", "async-ddp", "sync-fsdp", "async-fsdp")
    runs = [r for r in records if "mode" in r]
    assert sorted((r["mode"], r["rank"]) for r in runs) == sorted(
        (m, k) for m in modes for k in (0, 1)
    ), runs
    by = {r["mode"]: r for r in runs if r["rank"] == 0}
    assert by["none"]["saves"] == 0 and by["none"]["checkpoint_mb"] == 0
    for mode in modes[1:]:
        assert by[mode]["saves"] == 2 and by[mode]["blocked_s_median"] is not None
        assert by[mode]["checkpoint_mb"] > 0
    writers = [r for r in records if r.get("type") == "writer"]
    assert [r["writer"] for r in writers] == ["none", "thread", "process"]
    assert all(r["writes"] > 0 for r in writers[1:]), writers
    summary = (results / "summary.md").read_text()
    assert "## Checkpoint stalls" in summary and "| async-fsdp |" in summary
    assert "| process |" in summary
