"""The command line as a user runs it: a subprocess, real output."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_py, subprocess_env

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

KEYS = {
    "schema",
    "devlayer",
    "torch",
    "python",
    "platform",
    "backends",
    "selected",
    "selection_error",
    "devices",
    "comm",
    "launcher",
    "launcher_error",
    "visibility",
    "runtime_initialized",
    "warnings",
}


def _info(**env: str) -> dict:
    proc = run_py(["-m", "devlayer", "info", "--json"], env=subprocess_env(**env))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_info_json_schema_on_cpu():
    report = _info()
    assert set(report) == KEYS and report["schema"] == 1
    assert [b["name"] for b in report["backends"]] == ["cuda", "xpu", "mps", "cpu"]
    assert report["selected"]["name"] == "cpu"
    assert report["devices"] == {"type": "cpu", "count": 1, "names": []}
    assert report["comm"]["gloo"] is True and report["comm"]["nccl"] is False
    assert report["launcher"]["name"] == "none"


@pytest.mark.simulated
def test_info_json_with_simulated_cuda():
    report = _info(DEVLAYER_SIMULATE="cuda:2", CUDA_VISIBLE_DEVICES="0,1")
    assert report["selected"]["name"] == "cuda"
    assert report["devices"]["count"] == 2
    assert report["comm"]["nccl"] is True
    assert report["visibility"]["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert any("simulated" in w for w in report["warnings"])


def test_info_reports_unknown_backend_instead_of_crashing():
    report = _info(DEVLAYER_BACKEND="no-such-backend")
    assert report["selected"] is None
    assert "no-such-backend" in report["selection_error"]
    assert "registered: cpu, cuda, mps, xpu" in report["selection_error"]


def test_info_warns_about_thread_oversubscription_and_launcher_provenance():
    env = {
        "RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_PORT": "29999",
        "OMP_NUM_THREADS": "512",
    }
    report = _info(**env)
    assert report["launcher"]["sources"]["rank"] == "RANK"
    assert any("OMP_NUM_THREADS=512" in w for w in report["warnings"])


def test_info_text_and_version():
    proc = run_py(["-m", "devlayer", "info"])
    assert proc.returncode == 0 and "backends (auto-detect order):" in proc.stdout
    version = run_py(["-m", "devlayer", "--version"])
    assert version.stdout.startswith("devlayer ")


@pytest.mark.simulated
def test_info_json_with_simulated_xpu_explains_tiles():
    report = _info(DEVLAYER_SIMULATE="xpu:2", ZE_AFFINITY_MASK="0,1")
    assert report["selected"]["name"] == "xpu"
    assert report["devices"] == {
        "type": "xpu",
        "count": 2,
        "names": ["Simulated XPU 0", "Simulated XPU 1"],
    }
    assert report["comm"]["xccl"] is True and report["comm"]["nccl"] is False
    assert any("ZE_FLAT_DEVICE_HIERARCHY" in w and "tile" in w for w in report["warnings"])


def test_pitfalls_mig_ipex_and_initialized_runtime(monkeypatch):
    import devlayer.backends.xpu as xpu

    from devlayer.cli import info

    monkeypatch.setattr(xpu, "_version", lambda name: "2.8.10+xpu")
    warnings = info.pitfalls(
        {
            "CUDA_VISIBLE_DEVICES": "MIG-5c9a1b2e-0000-0000-0000-000000000000",
            "HIP_VISIBLE_DEVICES": "0",
        },
        {"selected": {"name": "cuda"}, "runtime_initialized": True},
    )
    text = "\n".join(warnings)
    assert "MIG is not multi-GPU" in text
    assert "does not match torch" in text and "IPEX 2.8.* needs torch 2.8.*" in text
    assert "already initialized" in text
    assert "HIP_VISIBLE_DEVICES are both set" in text
