"""Hang reports under the real launchers (issue 22, item E): srun and OpenMPI's mpirun.

A rank stuck in user code while the other waits in ``all_reduce`` (``init(timeout=8)``,
``DEVLAYER_WATCHDOG=3``): the waiting rank's error names the stuck rank, the function and
its line. A missing launcher skips here and fails with ``CI=true``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.launchers.test_real_launchers import _env, _need, slurm  # noqa: F401 (fixture)

pytestmark = [pytest.mark.launcher, pytest.mark.timeout(300)]

JOB = str(ROOT / "tests" / "dist" / "hang_job.py")


def _stuck(start: list[str], folder: Path) -> str:
    proc = subprocess.run(
        [*start, sys.executable, JOB, "stuck", str(folder)],
        capture_output=True,
        text=True,
        timeout=200,
        env=_env(DEVLAYER_WATCHDOG="3"),
        cwd=ROOT,
    )
    assert proc.returncode != 0
    return proc.stdout + proc.stderr


def _line() -> int:
    lines = Path(JOB).read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if "time.sleep(0.05)" in line)


def test_h22_14_srun_a_stuck_rank_is_named(slurm, tmp_path: Path) -> None:  # noqa: F811
    """H22-14: under real srun (-K: a failed task stops the step), rank 0's error names
    rank 1, stuck_in_user_code and its line."""
    out = _stuck(["srun", "-K", "-n", "2"], tmp_path)
    assert (
        f"rank 1 has not entered all_reduce #1; it is in stuck_in_user_code at "
        f"hang_job.py:{_line()}"
    ) in out, out[-4000:]


def test_h22_14_mpirun_a_stuck_rank_is_named(tmp_path: Path) -> None:
    """H22-14: under OpenMPI's mpirun, rank 0's error names rank 1, stuck_in_user_code and
    its line."""
    _need("mpirun.openmpi")
    out = _stuck(["mpirun.openmpi", "--oversubscribe", "-n", "2"], tmp_path)
    assert (
        f"rank 1 has not entered all_reduce #1; it is in stuck_in_user_code at "
        f"hang_job.py:{_line()}"
    ) in out, out[-4000:]
