"""devlayer under `accelerate launch`, and an Accelerator sharing devlayer's process group."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, rank_results, subprocess_env, torchrun

pytest.importorskip("accelerate")
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def _accelerate() -> list[str]:
    exe = Path(sys.executable).with_name("accelerate")
    return [str(exe)] if exe.exists() else [shutil.which("accelerate") or "accelerate"]


def test_accelerate_launch_multi_process_on_cpu(tmp_path):
    # --multi_gpu makes accelerate start torchrun; it runs on CPU too (gloo).
    cmd = [
        *_accelerate(),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(ROOT / "tests" / "dist" / "worker_collectives.py"),
        "30",
    ]
    proc = subprocess.run(
        cmd,
        env=subprocess_env(HOME=str(tmp_path)),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = rank_results(proc.stdout)
    assert [r["rank"] for r in results] == [0, 1]
    assert {r["launcher"] for r in results} == {"accelerate"}


def test_accelerator_after_init_agrees_with_devlayer(tmp_path):
    cmd = torchrun(str(ROOT / "tests" / "e2e" / "worker_accelerate.py"))
    proc = subprocess.run(
        cmd,
        env=subprocess_env(HOME=str(tmp_path)),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = rank_results(proc.stdout)
    assert len(results) == 2
    for r in results:
        assert (r["acc_rank"], r["acc_world"], r["acc_local"]) == (
            r["rank"],
            r["world"],
            r["local"],
        )
        assert r["acc_device_type"] == r["device_type"]
