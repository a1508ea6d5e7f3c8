"""The SLURM example scripts as users submit them, under the real one-node SLURM.

``tests/launchers/setup.sh`` starts that SLURM (CPU only, no GPUs configured); without it
these tests skip, and fail under ``CI=true`` (the ``slurm`` fixture).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import PY, ROOT
from tests.launchers.test_real_launchers import _env, slurm  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.launcher, pytest.mark.timeout(300)]

SINGLE_NODE = ROOT / "examples" / "slurm" / "single_node.sbatch"


def _sbatch(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``sbatch ARGS`` from the repository root (the script's submit directory)."""
    env = _env()
    env["PATH"] = os.pathsep.join([str(Path(PY).parent), env.get("PATH", "")])
    return subprocess.run(
        ["sbatch", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )


def test_r5_r8_single_node_sbatch_runs_unchanged_on_a_cpu_node(slurm, tmp_path):  # noqa: F811
    """R5-R8: ``examples/slurm/single_node.sbatch`` is accepted as written by a SLURM that
    has no GPUs (it asked for ``--gpus-per-task=1``: "Invalid generic resource (gres)
    specification"), and the job it starts trains on 2 CPU ranks over gloo; arguments after
    the script reach ``cifar_resnet.py`` (here a tiny run, in a temporary folder)."""
    probe = _sbatch("--test-only", str(SINGLE_NODE), timeout=60)
    assert probe.returncode == 0, probe.stderr
    out = tmp_path / "job.out"
    tiny = ["--epochs", "1", "--width", "4", "--samples", "64", "--batch-size", "32"]
    job = _sbatch(
        "--parsable",
        "--wait",
        "-o",
        str(out),
        str(SINGLE_NODE),
        *tiny,
        "--num-workers",
        "0",
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
        "--metrics-file",
        str(tmp_path / "metrics.jsonl"),
        timeout=280,
    )
    text = out.read_text() if out.exists() else ""
    assert job.returncode == 0, job.stderr + text
    assert "2 rank(s) on 1 node(s), 2 per node; backend cpu, device cpu, comm gloo" in text
    assert "summary: 1 epoch(s)" in text, text
    (row,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert row["world_size"] == 2 and row["epoch"] == 1
    assert any((tmp_path / "ckpt").iterdir()), "the checkpoint went to --checkpoint-dir"
