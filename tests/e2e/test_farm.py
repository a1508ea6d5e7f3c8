"""`devlayer farm`: one job per device at a time, each child sees only its device."""

from __future__ import annotations

import json
import os
import sys

import pytest

from devlayer.farm import farm
from tests.helpers import ROOT, run_py, subprocess_env

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

JOB = str(ROOT / "tests" / "e2e" / "farm_job.py")


def _records(folder) -> list[dict]:
    return sorted(
        (json.loads(p.read_text()) for p in folder.glob("job-*.json")), key=lambda r: r["job"]
    )


@pytest.mark.simulated
def test_farm_four_jobs_on_two_simulated_devices(tmp_path):
    env = subprocess_env(DEVLAYER_SIMULATE="cuda:2")
    proc = run_py(
        ["-m", "devlayer", "farm", "--count", "4", "--", sys.executable, JOB, str(tmp_path), "{}"],
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = _records(tmp_path)
    assert [r["job"] for r in records] == [0, 1, 2, 3]
    assert {r["cuda"] for r in records} == {"0", "1"}  # each child sees exactly one device
    assert all(r["slot"] == f"cuda:{r['cuda']}" for r in records)
    assert "4/4 jobs succeeded" in proc.stdout


def test_farm_on_cpu_splits_threads_and_reports_failures(tmp_path):
    cmd = [sys.executable, "-c", "import sys; sys.exit(3 if sys.argv[1] == '1' else 0)"]
    results = farm([[*cmd, str(i)] for i in range(3)], backend="cpu", parallel=2)
    assert [r.returncode for r in results] == [0, 3, 0]
    assert {r.slot for r in results} <= {"cpu#0", "cpu#1"}
    proc = run_py(
        [
            "-m",
            "devlayer",
            "farm",
            "--backend",
            "cpu",
            "--parallel",
            "2",
            "--count",
            "2",
            "--",
            sys.executable,
            JOB,
            str(tmp_path),
            "{}",
        ]
    )
    assert proc.returncode == 0, proc.stderr
    cores = len(os.sched_getaffinity(0))
    assert {r["omp"] for r in _records(tmp_path)} == {str(max(cores // 2, 1))}


def test_farm_jobs_file_and_exit_code(tmp_path):
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("0\n7\n")
    proc = run_py(
        [
            "-m",
            "devlayer",
            "farm",
            "--backend",
            "cpu",
            "--parallel",
            "1",
            "--jobs",
            str(jobs),
            "--",
            sys.executable,
            "-c",
            "import sys; sys.exit(int(sys.argv[1]))",
        ]
    )
    assert proc.returncode == 1
    assert "1/2 jobs succeeded" in proc.stdout


def test_job_line_inside_a_shell_command_is_quoted_for_the_shell(tmp_path):
    # Issue 14: `{}` inside an argument was replaced unquoted, so a job line ran as shell code.
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("'x; touch pwned' two\n")
    proc = run_py(
        [
            "-m",
            "devlayer",
            "farm",
            "--backend",
            "cpu",
            "--parallel",
            "1",
            "--jobs",
            str(jobs),
            "--",
            "sh",
            "-c",
            "echo got {}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (tmp_path / "pwned").exists()
    assert "got x; touch pwned two" in proc.stdout


def test_job_line_as_whole_arguments_is_argv_not_shell(monkeypatch):
    import io
    from argparse import Namespace

    from devlayer.cli.farm import _commands

    monkeypatch.setattr("sys.stdin", io.StringIO("'a b' c\nplain\n"))
    args = Namespace(job=["--", "prog", "{}", "--tag={}"], count=None, jobs="-")
    # A whole `{}` becomes the line's words (argv, no shell); inside an argument the line
    # is quoted for a shell, and a simple one-word line stays as it is.
    assert _commands(args) == [
        ["prog", "a b", "c", "--tag='a b' c"],
        ["prog", "plain", "--tag=plain"],
    ]
