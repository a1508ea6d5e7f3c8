"""Hang reports under torchrun (issue 22, items B, C, E): 2 real gloo ranks in a subprocess.

Each job uses ``init(timeout=8)``; the test's timeout mark is the hang guard, never a
timed assertion. The dumps go into a folder of the test's own (``init(hang_dir=...)``).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from devlayer.hangreport import read_dumps
from tests.helpers import ROOT, rank_results, subprocess_env, torchrun

pytestmark = [pytest.mark.e2e]

JOB = str(ROOT / "tests" / "dist" / "hang_job.py")


def _job(mode: str, folder: Path, **env: str) -> subprocess.CompletedProcess[str]:
    cmd = torchrun("--monitor-interval=0.2", JOB, mode, str(folder))
    return subprocess.run(
        cmd,
        env=subprocess_env(**env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
    )


def _line(source: str, text: str) -> int:
    lines = Path(source).read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if text in line)


@pytest.mark.timeout(200)
def test_h22_3_sigusr1_dumps_and_goes_on_and_a_job_without_hang_writes_none(tmp_path) -> None:
    """H22-3: SIGUSR1 writes the rank's dump (0600 JSON with its stacks and ledger), runs
    the user's own SIGUSR1 handler and the job goes on; rank 0, which got no signal, writes
    nothing; after shutdown() the SIGTERM, SIGINT and SIGUSR1 handlers are the ones from
    before init()."""
    proc = _job("ok", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = rank_results(proc.stdout)
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert r["installed"] == [True, True, True] and r["restored"] == [True, True, True]
    assert results[0]["user_handler"] == [] and len(results[1]["user_handler"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank1.json"]
    dump = tmp_path / "rank1.json"
    assert dump.stat().st_mode & 0o777 == 0o600
    doc = json.loads(dump.read_text())
    assert doc["reason"] == "signal SIGUSR1" and doc["rank"] == 1 and doc["world_size"] == 2
    assert [r["op"] for r in doc["ledger"]] == ["all_reduce"] * 3
    assert any(t["main"] and t["stack"] for t in doc["threads"])
    assert doc["where"]["function"] == "ok", doc["where"]


@pytest.mark.timeout(200)
def test_h22_4_a_rank_stuck_in_user_code_is_named_with_its_function_and_line(tmp_path) -> None:
    """H22-4: rank 1 loops in stuck_in_user_code() while rank 0 waits in all_reduce: rank
    0's CollectiveError says rank 1 has not entered all_reduce #1 and is in
    stuck_in_user_code at hang_job.py:<line> (rank 1's watchdog dump), and
    ``devlayer hangs DIR`` prints the same afterwards."""
    proc = _job("stuck", tmp_path, DEVLAYER_WATCHDOG="3")
    assert proc.returncode != 0
    line = _line(JOB, "time.sleep(0.05)")
    expected = (
        f"rank 1 has not entered all_reduce #1; it is in stuck_in_user_code at hang_job.py:{line}"
    )
    assert "CollectiveError: all_reduce failed on rank 0 of 2" in proc.stderr, proc.stderr
    assert expected in proc.stderr, proc.stderr[-4000:]
    assert "rank 0 waited in all_reduce #1 [4] float32 at hang_job.py:" in proc.stderr
    reports, problems = read_dumps(tmp_path)
    assert sorted(reports) == [0, 1] and not problems
    cli = subprocess.run(
        [*torchrun()[:1], "-m", "devlayer", "hangs", str(tmp_path)],
        env=subprocess_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0 and expected in cli.stdout, cli.stdout + cli.stderr


@pytest.mark.timeout(200)
def test_h22_5_a_rank_that_exited_with_code_0_is_named(tmp_path) -> None:
    """H22-5: rank 1 exits with code 0 before the all_reduce rank 0 waits in: rank 0's
    error names rank 1 as the rank that left no report (exited or killed) instead of
    "a peer rank probably exited"."""
    proc = _job("exit0", tmp_path)
    assert proc.returncode != 0
    assert "all_reduce failed on rank 0 of 2" in proc.stderr, proc.stderr[-4000:]
    assert "rank(s) 1 left no report (no dump, no answer): exited or killed" in proc.stderr
    assert "probably exited" not in proc.stderr


@pytest.mark.timeout(200)
def test_h22_6_ranks_in_different_collectives_are_named(tmp_path) -> None:
    """H22-6: rank 0 calls barrier while rank 1 calls all_reduce at the same point (the
    barrier is not argument-checked): the report names both calls at sequence number 1."""
    proc = _job("mismatch", tmp_path)
    assert proc.returncode != 0
    assert "ranks called different collectives at #1: rank 0 barrier #1 at hang_job.py:" in (
        proc.stderr
    ), proc.stderr[-4000:]
    assert "rank 1 all_reduce #1 [4] float32 at hang_job.py:" in proc.stderr
