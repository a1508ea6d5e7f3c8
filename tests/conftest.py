"""Shared fixtures: every test starts and ends with a clean process.

* Environment changes must go through ``monkeypatch``: a test that leaves a variable
  changed, or devlayer initialized, or a process group behind, fails.
* ``gpu`` tests are skipped unless a real CUDA device exists.
* ``ipex`` tests are skipped unless intel-extension-for-pytorch is installed
  (``tox -e ipex``).
* ``trackers`` tests are skipped unless mlflow is installed; under ``tox -e trackers``
  (``REQUIRE_TRACKERS=1``) they run, and fail without it.
* ``ray`` tests are skipped unless ray is installed, and fail without it under
  ``DEVLAYER_REQUIRE_RAY=1`` (``tox -e ray``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.helpers import _LAUNCH_NAMES, _LAUNCH_PREFIXES, toy_trainer


def _cuda_present() -> bool:
    try:
        import torch

        return bool(torch.cuda.device_count() > 0)
    except Exception:
        return False


def _ipex_installed() -> bool:
    return importlib.util.find_spec("intel_extension_for_pytorch") is not None


def _mlflow_installed() -> bool:
    return importlib.util.find_spec("mlflow") is not None


def _ray_skipped() -> bool:
    """ray tests skip without ray, unless ``DEVLAYER_REQUIRE_RAY=1`` (tox -e ray) says it
    must be there: then they run and fail, naming the missing package."""
    if os.environ.get("DEVLAYER_REQUIRE_RAY", "").strip() == "1":
        return False
    return importlib.util.find_spec("ray") is None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skips = {}
    if not _ipex_installed():
        skips["ipex"] = pytest.mark.skip(
            reason="needs intel-extension-for-pytorch (tox -e ipex; see docs/intel.md)"
        )
    if not _mlflow_installed() and not os.environ.get("REQUIRE_TRACKERS"):
        skips["trackers"] = pytest.mark.skip(
            reason="needs mlflow: pip install 'devlayer[mlflow]' or tox -e trackers"
        )
    if _ray_skipped():
        skips["ray"] = pytest.mark.skip(
            reason="needs ray[train] (tox -e ray, or pip install -e '.[ray]'; docs/training.md)"
        )
    if any("gpu" in item.keywords for item in items) and not _cuda_present():
        skips["gpu"] = pytest.mark.skip(
            reason="needs a real CUDA device (pytest -m gpu on a GPU machine)"
        )
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)


# Set by pytest or by torch itself on first use of some subsystems, not by devlayer.
_NOT_OURS = {"PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"}


@pytest.fixture(autouse=True)
def _no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    before = dict(os.environ)
    yield
    import devlayer

    problems = []
    if devlayer.is_initialized():
        devlayer.shutdown()
        problems.append("devlayer left initialized (call devlayer.shutdown())")
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
            problems.append("a torch.distributed process group was left behind")
    after = dict(os.environ)
    changed = sorted(
        k for k in set(before) | set(after) if before.get(k) != after.get(k) and k not in _NOT_OURS
    )
    if changed:
        for k in changed:
            if k in before:
                os.environ[k] = before[k]
            else:
                os.environ.pop(k, None)
        problems.append(f"environment variables leaked: {', '.join(changed)}")
    if problems:
        pytest.fail(f"{request.node.nodeid}: " + "; ".join(problems))


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Remove launcher and devlayer variables so a test sees a plain single process."""
    names = (
        *_LAUNCH_NAMES,
        "CUDA_VISIBLE_DEVICES",
        "HIP_VISIBLE_DEVICES",
        "ROCR_VISIBLE_DEVICES",
        "ZE_AFFINITY_MASK",
        "ONEAPI_DEVICE_SELECTOR",
    )
    for key in list(os.environ):
        if key.startswith(_LAUNCH_PREFIXES) or key in names:
            monkeypatch.delenv(key)
    return monkeypatch


@pytest.fixture
def sim(clean_env: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """clean_env, plus a private DEVLAYER_SIMULATE cache (its fakes keep state per spec)."""
    from devlayer import simulation

    clean_env.setattr(simulation, "_runtime_cache", {})
    return clean_env


@pytest.fixture
def make_trainer() -> Callable[..., Any]:
    """The one Trainer factory (:func:`tests.helpers.toy_trainer`): ``make_trainer(**options)``
    is a toy regression Trainer (``Linear(1, 1)``, SGD, MSE, ``batch_size=8``, no progress,
    no workers); pass ``model``, ``optimizer``, ``loss_fn``, ``lr``, ``init_seed`` or any
    ``Trainer`` option to change it."""
    return toy_trainer
