"""Hang reports under the real launchers (issue 22, item E): srun, OpenMPI's mpirun and
MPICH's mpiexec.

A rank stuck in user code, a rank that exits with code 0, ranks in different collectives
(``init(timeout=8)``, ``DEVLAYER_WATCHDOG=3``): rank 0's error names the rank and, when it
is stuck, the function and its line. A missing launcher skips here, fails with ``CI=true``.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.launchers.test_real_launchers import _env, _need, slurm  # noqa: F401 (fixture)

pytestmark = [pytest.mark.launcher, pytest.mark.timeout(300)]

JOB = str(ROOT / "tests" / "dist" / "hang_job.py")


def _job(start: list[str], mode: str, folder: Path) -> str:
    proc = subprocess.run(
        [*start, sys.executable, JOB, mode, str(folder)],
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


def _expected(mode: str) -> str:
    if mode == "stuck":
        return (
            f"rank 1 has not entered all_reduce #1; it is in stuck_in_user_code at "
            f"hang_job.py:{_line()}"
        )
    if mode == "exit0":
        return "rank(s) 1 left no report (no dump, no answer): exited or killed"
    return "ranks called different collectives at #1: rank 0 barrier #1 at hang_job.py:"


MODES = ["stuck", "exit0", "mismatch"]


@pytest.mark.parametrize("mode", MODES)
def test_h22_14_srun_names_the_rank(slurm, tmp_path: Path, mode: str) -> None:  # noqa: F811
    """H22-14: under real srun (-K: a failed task stops the step), a rank stuck in user
    code, a rank that exits with code 0, and ranks in different collectives are named
    in rank 0's error."""
    out = _job(["srun", "-K", "-n", "2"], mode, tmp_path)
    assert _expected(mode) in out, out[-4000:]


@pytest.mark.parametrize("mode", MODES)
def test_h22_14_mpirun_names_the_rank(tmp_path: Path, mode: str) -> None:
    """H22-14: the same three cases under OpenMPI's mpirun."""
    _need("mpirun.openmpi")
    out = _job(["mpirun.openmpi", "--oversubscribe", "-n", "2"], mode, tmp_path)
    assert _expected(mode) in out, out[-4000:]


def _stopped_after_the_report(start: list[str], mode: str, folder: Path) -> str:
    """Run the job until rank 0's report is out, then stop the launcher with SIGTERM (as a
    user or a scheduler would): MPICH's Hydra ends a job when a rank dies of a signal, not
    when one exits with code 1, so a rank stuck in user code would run on."""
    proc = subprocess.Popen(
        [*start, sys.executable, JOB, mode, str(folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(DEVLAYER_WATCHDOG="3"),
        cwd=ROOT,
    )
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:  # the report comes at the timeout (8 s) plus a short grace
        seen.append(line)
        if "(dumps in " in line:
            break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    return "".join(seen) + (rest or "")


@pytest.mark.parametrize("mode", MODES)
def test_h22_25_mpich_mpiexec_names_the_rank(tmp_path: Path, mode: str) -> None:
    """H22-25: the same three cases under MPICH's mpiexec (Hydra): a rank stuck in user
    code, a rank that exits with code 0, and ranks in different collectives are named in
    rank 0's error. Hydra does not stop the stuck rank when rank 0 exits with code 1:
    that job is stopped with SIGTERM once the report is out, and the stuck rank then
    writes its dump too."""
    _need("mpiexec.hydra")
    start = ["mpiexec.hydra", "-n", "2"]
    if mode == "stuck":
        out = _stopped_after_the_report(start, mode, tmp_path)
        assert "devlayer: rank 1: SIGTERM: hang report written to " in out, out[-4000:]
    else:
        out = _job(start, mode, tmp_path)
    assert _expected(mode) in out, out[-4000:]
