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
    assert {r["impl"] for r in results} == {"raw", "devlayer", "devlayer_checked"}
    assert {r["section"] for r in results} == {"all_reduce"}
    assert "### all_reduce" in proc.stdout
