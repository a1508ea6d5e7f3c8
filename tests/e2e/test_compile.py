"""Trainer(compile=True) on CPU: same losses as eager; a missing compiler is named clearly."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT, missing_program, subprocess_env

pytestmark = [pytest.mark.timeout(600)]


def _job(tmp_path, *modes: str, **env: str) -> dict:
    # A fresh inductor cache: a cached kernel would hide a missing compiler.
    extra = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), **env}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.e2e.compile_job", *modes],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=subprocess_env(**extra),
        timeout=540,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_compiled_trainer_gives_the_losses_of_the_eager_one(tmp_path):
    if shutil.which("c++") is None and shutil.which("g++") is None:
        missing_program("no C++ compiler for torch.compile (tests/launchers/setup.sh installs g++)")
    out = _job(tmp_path, "eager", "compiled")
    eager, compiled = out.get("losses", [None, None])
    assert eager and compiled, out
    assert len(compiled) == len(eager) == 12
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-6)
    assert compiled[-1] < compiled[0]
    assert out["models"] == ["Sequential", "OptimizedModule"]  # compile=True took effect


def test_compile_without_a_compiler_names_what_is_missing(tmp_path):
    out = _job(tmp_path, "compiled", CXX=str(tmp_path / "no-such-c++"))
    assert out.get("error") == "DevlayerError", out
    message = out["message"]
    assert "torch.compile cannot build code for cpu devices here" in message
    assert "C++ compiler" in message and "compile=False" in message
    assert "InvalidCxxCompiler" in message  # the cause, in one line
