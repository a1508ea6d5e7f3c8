"""The example third-party backend in examples/plugin: registered by hand and installed."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

import devlayer
from devlayer import registry
from devlayer.errors import BackendUnavailableError
from tests.helpers import ROOT, run_py, subprocess_env

PLUGIN_DIR = ROOT / "examples" / "plugin"


@pytest.fixture
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty registry that loads the built-ins again; the real one comes back after."""
    monkeypatch.setattr(registry, "_backends", {})
    monkeypatch.setattr(registry, "_loaded_builtins", False)
    monkeypatch.setattr(registry, "_loaded_entry_points", False)
    monkeypatch.setattr(registry, "_entry_point_errors", {})


def _load_toy() -> ModuleType:
    """Import examples/plugin/devlayer_toy.py without touching sys.path or sys.modules."""
    spec = importlib.util.spec_from_file_location(
        "_devlayer_toy_test", PLUGIN_DIR / "devlayer_toy.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_toy_registered_by_hand(clean_env: pytest.MonkeyPatch, fresh_registry: None) -> None:
    toy = _load_toy()
    assert devlayer.backends.register_backend(toy.ToyBackend).name == "toy"
    backend = devlayer.backends.get_backend("toy")
    names = list(devlayer.backends.registered_backends())
    assert names.index("toy") > names.index("cpu")  # priority -10: after cpu
    assert devlayer.backends.available_backends()[-2:] == ["cpu", "toy"]

    with devlayer.init(backend="toy") as st:
        assert (st.backend, str(st.device), st.device_index, st.comm) == ("toy", "cpu", None, None)
        assert devlayer.backend() == "toy"
    assert backend.comm_backend() == "gloo"
    with pytest.raises(BackendUnavailableError, match="'nccl' is not available for backend 'toy'"):
        backend.comm_backend("nccl")


def test_toy_selected_by_env(clean_env: pytest.MonkeyPatch, fresh_registry: None) -> None:
    devlayer.backends.register_backend(_load_toy().ToyBackend)
    clean_env.setenv("DEVLAYER_BACKEND", "toy")
    with devlayer.init() as st:
        assert (st.backend, str(st.device)) == ("toy", "cpu")
        assert "DEVLAYER_BACKEND='toy'" in st.reason
    clean_env.delenv("DEVLAYER_BACKEND")
    with devlayer.init() as st:
        assert st.backend != "toy"  # never auto-detected


def test_toy_doctest(clean_env: pytest.MonkeyPatch, fresh_registry: None) -> None:
    import doctest

    result = doctest.testmod(_load_toy(), verbose=False)
    assert result.attempted > 0
    assert result.failed == 0


CHILD = textwrap.dedent(
    """
    import json, os
    import devlayer, devlayer_toy
    from devlayer.registry import entry_point_errors
    out = {
        "module": devlayer_toy.__file__,
        "registered": list(devlayer.backends.registered_backends()),
        "errors": entry_point_errors(),
    }
    with devlayer.init() as st:
        out["auto"] = st.backend
    os.environ["DEVLAYER_BACKEND"] = "toy"
    with devlayer.init() as st:
        out["env"] = [st.backend, str(st.device), st.reason]
    print(json.dumps(out))
    """
)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_installed_plugin_found_through_entry_point(tmp_path: Path) -> None:
    # Build from a copy so pip's build/ and *.egg-info do not land in the checkout.
    src, site = tmp_path / "src", tmp_path / "site"
    shutil.copytree(PLUGIN_DIR, src, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--no-index", "--no-cache-dir", "--disable-pip-version-check", "--quiet",
         "--target", str(site), str(src)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stdout + pip.stderr
    assert list(site.glob("devlayer_toy-*.dist-info/entry_points.txt"))

    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT)])
    proc = run_py(["-c", CHILD], env=env, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(out["module"]).parent == site  # the installed copy, not examples/
    assert "toy" in out["registered"]
    assert out["registered"].index("toy") > out["registered"].index("cpu")
    assert out["errors"] == {}
    assert out["auto"] != "toy"
    backend, device, reason = out["env"]
    assert (backend, device) == ("toy", "cpu")
    assert "DEVLAYER_BACKEND='toy'" in reason
