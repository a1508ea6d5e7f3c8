"""``devlayer launch``'s summary when ranks fail: the hang report and how each rank that
left no dump ended (issue 22, item 3), with a real ``devlayer launch --nproc 2``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import ROOT, run_py, subprocess_env

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

JOB = str(ROOT / "tests" / "dist" / "hang_job.py")


def _launch(mode: str, folder: Path) -> tuple[int, str]:
    env = subprocess_env(DEVLAYER_HANG_DIR=str(folder), DEVLAYER_WATCHDOG="3")
    proc = run_py(
        ["-m", "devlayer", "launch", "--nproc", "2", "--monitor-interval", "0.2", JOB, mode, "env"],
        env=env,
        timeout=180,
    )
    return proc.returncode, proc.stderr


def _summary(stderr: str) -> str:
    """What follows devlayer launch's line naming the failed rank."""
    return stderr[stderr.index("devlayer launch: rank ") :]


def test_h22_24_launch_names_a_killed_rank_by_its_signal(tmp_path: Path) -> None:
    """H22-24: rank 1 dies of SIGKILL (no dump) while rank 0 waits in all_reduce: the
    summary of ``devlayer launch`` prints the hang report read from the folder, with rank 0
    in all_reduce and rank 1 named as the rank that left no report, killed by SIGKILL."""
    code, err = _launch("kill", tmp_path)
    assert code == 128 + 9, err[-3000:]
    summary = _summary(err)
    assert f"hang report (devlayer hangs {tmp_path}):" in summary, summary
    # rank 0 waits, or waited until gloo saw the peer's connection close
    assert "in all_reduce #1 [4] float32 at hang_job.py:" in summary.split("rank 0 wait")[1]
    assert "rank(s) 1 left no report (no dump, no answer): rank 1 was killed by SIGKILL" in (
        summary
    ), summary


def test_h22_24_launch_prints_where_a_stuck_rank_is(tmp_path: Path) -> None:
    """H22-24: rank 1 loops in user code while rank 0's all_reduce times out (exit code 1):
    the summary names rank 1, the collective it has not entered and its function and line
    (from the dump it wrote when devlayer launch stopped it), and names no rank as gone."""
    code, err = _launch("stuck", tmp_path)
    assert code == 1, err[-3000:]
    summary = _summary(err)
    assert "rank 1 has not entered all_reduce #1; it is in stuck_in_user_code at hang_job.py:" in (
        summary
    ), summary
    assert "left no report" not in summary, summary


def test_launch_passes_its_ranks_a_hang_folder_of_its_own(clean_env) -> None:
    """Without DEVLAYER_HANG_DIR, devlayer launch picks one folder per launch and passes
    it to its ranks; the user's folder is kept; with hang reports off it reads none."""
    import os

    from devlayer.cli.launch import _hang_folder

    clean_env.setenv("DEVLAYER_HANG_DIR", "undone after the test")  # recorded for undo
    clean_env.delenv("DEVLAYER_HANG_DIR")
    folder = _hang_folder({})
    assert folder is not None and Path(folder).name == f"launch-pid{os.getpid()}"
    assert Path(folder).parent.name.startswith("devlayer-hangs-")
    assert os.environ["DEVLAYER_HANG_DIR"] == folder
    assert _hang_folder({"DEVLAYER_HANG_DIR": "/mine"}) == "/mine"
    assert _hang_folder({"DEVLAYER_HANG_REPORTS": "0"}) is None
