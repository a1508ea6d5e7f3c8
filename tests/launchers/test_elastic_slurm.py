"""A SLURM job requeued with fewer tasks resumes exactly (issue 23), under real sbatch/srun.

A 2-task job trains with a checkpoint every step and is cut with ``scancel --signal=TERM``;
the same script submitted again with 1 task (what users do when nodes are lost) resumes at
world size 1: every optimizer step trains on the samples of an uninterrupted run, and the
final weights equal that run's within float64 tolerance.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.test_elastic_torchrun import STEPS_PER_EPOCH, _expected, _steps_kept
from tests.helpers import PY, ROOT
from tests.launchers.test_real_launchers import _job_script, _sbatch, _wait_gone, slurm

pytestmark = [pytest.mark.launcher, pytest.mark.timeout(600)]

__all__ = ["slurm"]  # the fixture, imported for the tests below

WORKER = ROOT / "tests" / "e2e" / "worker_elastic.py"
#: The 2-task job waits in this step until ``scancel --signal=TERM`` reaches it.
HOLD_STEP = 6


def _script(folder: Path, name: str, ntasks: int, *args: str) -> Path:
    return _job_script(folder / name, f"srun {PY} {WORKER} {' '.join(args)}", ntasks=ntasks)


def _weights(out: str) -> dict[str, list[float]]:
    line = re.search(r"^WEIGHTS (.*)$", out, re.M)
    assert line, out[-3000:]
    return json.loads(line.group(1))


def _trained_at(folder: Path, world: int, step: int) -> bool:
    for path in folder.glob("records-*.jsonl"):
        for line in path.read_text().splitlines():
            if line.endswith("}"):
                record = json.loads(line)
                if record["world"] == world and record["step"] >= step:
                    return True
    return False


def _cut(folder: Path, job: int, out: Path) -> None:
    """Wait until the 2-task job trains at ``HOLD_STEP``, then ``scancel --signal=TERM``."""
    end = time.monotonic() + 240
    while not _trained_at(folder, 2, HOLD_STEP):
        text = out.read_text() if out.exists() else ""
        assert time.monotonic() < end, f"job {job} never reached step {HOLD_STEP}:\n{text}"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=TERM", str(job)], check=True, timeout=20)
    _wait_gone(job, timeout=180)


def test_e23_12_a_slurm_job_requeued_with_fewer_tasks_resumes_exactly(slurm, tmp_path):
    """E23-12: real sbatch/srun: a 2-task job (checkpoint every step,
    ``allow_world_size_change=True``) is cut by ``scancel --signal=TERM`` mid-epoch and
    stops with a checkpoint; the same script submitted again with ``-n 1`` resumes it at
    world size 1 (``grad_accum`` 1 -> 2, the global batch kept) and finishes at the step
    count of an uninterrupted run; every optimizer step trained on the samples of that run
    and the final weights equal the uninterrupted 2-task job's within 1e-9."""
    ref = tmp_path / "ref"
    ref.mkdir()
    _, ref_out = _sbatch(_script(ref, "ref.sh", 2, str(ref)), timeout=300)
    reference = _weights(Path(ref_out).read_text())

    run = tmp_path / "run"
    run.mkdir()
    job, out = _sbatch(_script(run, "two.sh", 2, str(run), str(HOLD_STEP), "2"), wait=False)
    _cut(run, job, Path(out))
    stopped = Path(out).read_text()
    assert "PreemptedError" in stopped and "DONE" not in stopped, stopped[-3000:]

    _, out = _sbatch(_script(run, "one.sh", 1, str(run)), timeout=300)
    text = Path(out).read_text()
    assert f"DONE rank=0 world=1 step={2 * STEPS_PER_EPOCH}" in text, text[-3000:]
    assert "world size changed 2 -> 1" in text, text[-3000:]
    assert "grad_accum 2" in text, text[-3000:]
    assert _steps_kept(run) == _expected()
    resumed = _weights(text)
    assert resumed.keys() == reference.keys()
    for name, values in reference.items():
        pairs = zip(values, resumed[name], strict=True)
        assert all(math.isclose(a, b, abs_tol=1e-9) for a, b in pairs), (name, resumed[name])
