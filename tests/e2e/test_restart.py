"""Re-initialization after torchrun restarts is reliable (each attempt its own store keys)."""

from __future__ import annotations

import subprocess

import pytest

from tests.helpers import ROOT, subprocess_env, torchrun

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(240)]


def test_torchrun_restarts_reinitialize_cleanly():
    cmd = torchrun(
        "--max-restarts=4",
        "--monitor-interval=0.2",
        str(ROOT / "tests" / "e2e" / "worker_restart.py"),
        "3",
    )
    proc = subprocess.run(
        cmd, env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=220
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "OK attempt=3" in proc.stdout
    assert "connectFullMesh" not in proc.stderr
