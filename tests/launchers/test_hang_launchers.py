"""Hang reports under the real launchers (issue 22, item E): srun, OpenMPI's mpirun and
MPICH's mpiexec.

A rank stuck in user code, a rank that exits with code 0, ranks in different collectives
(``init(timeout=8)``, ``DEVLAYER_WATCHDOG=3``): rank 0's error names the rank and, when it
is stuck, the function and its line. A missing launcher skips here, fails with ``CI=true``.
"""

from __future__ import annotations

import json
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


def _stopped_by_its_watch(out: str, folder: Path) -> None:
    """Rank 1 (stuck in user code) read rank 0's failure mark and stopped itself."""
    line = "devlayer: rank 1: peer rank 0 failed: all_reduce failed on rank 0 of 2; "
    assert f"{line}hang report written to {folder / 'rank1.json'}" in out, out[-4000:]
    dump = json.loads((folder / "rank1.json").read_text())
    assert dump["reason"].startswith("peer rank 0 failed: "), dump["reason"]
    assert dump["where"]["function"] == "stuck_in_user_code", dump["where"]


def test_h22_s1_srun_without_kill_on_bad_exit_ends_by_itself(slurm, tmp_path: Path) -> None:  # noqa: F811
    """H22-S1: under real srun without -K (KillOnBadExit=0 here, SLURM's default), which
    leaves rank 1 running when rank 0 exits with code 1: rank 1, stuck in user code,
    stops itself with its dump naming stuck_in_user_code, and the step ends by itself."""
    out = _job(["srun", "-n", "2"], "stuck", tmp_path)
    assert _expected("stuck") in out, out[-4000:]
    _stopped_by_its_watch(out, tmp_path)


@pytest.mark.parametrize("mode", MODES)
def test_h22_14_mpirun_names_the_rank(tmp_path: Path, mode: str) -> None:
    """H22-14: the same three cases under OpenMPI's mpirun."""
    _need("mpirun.openmpi")
    out = _job(["mpirun.openmpi", "--oversubscribe", "-n", "2"], mode, tmp_path)
    assert _expected(mode) in out, out[-4000:]


@pytest.mark.parametrize("mode", MODES)
def test_h22_25_mpich_mpiexec_names_the_rank(tmp_path: Path, mode: str) -> None:
    """H22-25: the same three cases under MPICH's mpiexec (Hydra): a rank stuck in user
    code, a rank that exits with code 0, and ranks in different collectives are named in
    rank 0's error. Hydra does not stop the other ranks when rank 0 exits with code 1;
    the job still ends by itself (H22-S1): the stuck rank reads rank 0's failure mark in
    the store, writes its dump (naming stuck_in_user_code) and stops itself."""
    _need("mpiexec.hydra")
    out = _job(["mpiexec.hydra", "-n", "2"], mode, tmp_path)
    assert _expected(mode) in out, out[-4000:]
    if mode == "stuck":
        _stopped_by_its_watch(out, tmp_path)
