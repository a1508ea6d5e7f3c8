"""IPEX for real: run by ``tox -e ipex`` (torch 2.8 + intel-extension-for-pytorch 2.8.0, CPU).

Every test here is marked ``ipex`` and skips when IPEX is not installed (the default test
environment has torch 2.13, for which no IPEX exists). Nothing is simulated: the version
check reads the installed package's metadata, ``ipex.optimize`` really rewrites the model
and optimizer, and the xpu backend's ccl path really imports IPEX before the bindings.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset

import devlayer
from devlayer.errors import BackendUnavailableError

pytestmark = pytest.mark.ipex

ipex_helpers = importlib.import_module("devlayer.backends._ipex")


def _data(n: int = 512) -> TensorDataset:
    """Learnable 3-class problem: labels from a fixed random linear teacher."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(n, 16, generator=gen)
    y = (x @ torch.randn(16, 3, generator=gen)).argmax(dim=1)
    return TensorDataset(x, y)


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))


def _fit(optimize: str | None, precision: str = "32", **kw: Any) -> tuple[Any, list[dict]]:
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
    trainer = devlayer.Trainer(
        net,
        opt,
        torch.nn.functional.cross_entropy,
        batch_size=64,
        max_epochs=kw.pop("max_epochs", 8),
        optimize=optimize,
        precision=precision,
        progress=False,
        num_workers=0,
        resume=kw.pop("resume", None),
        **kw,
    )
    with devlayer.init(backend="cpu"):
        history = trainer.fit(_data())
    return trainer, history


def test_import_ipex_matches_torch() -> None:
    ipex = ipex_helpers.import_ipex("test")
    assert ipex.__name__ == "intel_extension_for_pytorch"
    version = ipex_helpers.installed_version(ipex_helpers.IPEX_DIST)
    assert version is not None
    assert ipex_helpers.minor(version) == ipex_helpers.minor(torch.__version__)


def test_trainer_optimize_ipex_converges_like_plain_torch() -> None:
    _, plain_hist = _fit(None)
    fused, hist = _fit("ipex")
    # IPEX rewrote the optimizer step (a fused SGD kernel).
    assert fused.optimizer.step.__module__.startswith("intel_extension_for_pytorch") or (
        type(fused.optimizer).__module__.startswith("intel_extension_for_pytorch")
    ), f"ipex.optimize did not touch the optimizer: {fused.optimizer.step!r}"
    assert hist[-1]["train_loss"] < 0.25 * hist[0]["train_loss"]
    # Same data order, same init: fp32 IPEX follows plain torch closely.
    assert hist[-1]["train_loss"] == pytest.approx(plain_hist[-1]["train_loss"], rel=0.05, abs=5e-3)


def test_trainer_optimize_ipex_bf16() -> None:
    _, hist = _fit("ipex", precision="bf16-mixed")
    losses = [h["train_loss"] for h in hist]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0]


def test_trainer_optimize_ipex_checkpoint_resume(tmp_path: Path) -> None:
    _, first = _fit("ipex", max_epochs=3, checkpoint_dir=tmp_path)
    resumed, rest = _fit("ipex", max_epochs=6, checkpoint_dir=tmp_path, resume="auto")
    assert resumed.resumed_from is not None
    assert [h["epoch"] for h in rest][:3] == [h["epoch"] for h in first]
    assert len(rest) == 6
    assert rest[-1]["train_loss"] < first[-1]["train_loss"]


def test_version_mismatch_is_refused_with_both_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    version = ipex_helpers.installed_version(ipex_helpers.IPEX_DIST)
    monkeypatch.setattr(torch, "__version__", "2.99.0+cpu")
    with pytest.raises(BackendUnavailableError) as info:
        ipex_helpers.import_ipex("optimize='ipex'")
    msg = str(info.value)
    assert f"intel-extension-for-pytorch {version} does not match torch 2.99.0+cpu" in msg
    assert f"torch=={ipex_helpers.minor(version)}.*" in msg


@pytest.mark.skipif(
    importlib.util.find_spec("oneccl_bindings_for_pytorch") is not None,
    reason="the oneCCL bindings are installed; this checks the error when they are not",
)
def test_xpu_ccl_path_imports_ipex_then_names_the_missing_bindings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delitem(sys.modules, "intel_extension_for_pytorch", raising=False)
    with pytest.raises(BackendUnavailableError) as info:
        devlayer.backends.get_backend("xpu").prepare("ccl")
    assert "intel_extension_for_pytorch" in sys.modules  # imported first, for real
    msg = str(info.value)
    assert "comm 'ccl' needs oneccl_bindings_for_pytorch (oneccl_bind_pt)" in msg


def _two_rank_ipex_fit() -> dict[str, Any]:
    """One rank's part of a 2-rank fit with optimize="ipex" (importable for spawn)."""
    net = _net()
    trainer = devlayer.Trainer(
        net,
        torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9),
        torch.nn.functional.cross_entropy,
        batch_size=64,
        max_epochs=4,
        optimize="ipex",
        progress=False,
        num_workers=0,
        resume=None,
    )
    history = trainer.fit(_data())
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return {"history": history, "weights": state}


def test_trainer_optimize_ipex_under_ddp_on_two_ranks() -> None:
    r0, r1 = devlayer.spawn(_two_rank_ipex_fit, nprocs=2, backend="cpu", join_timeout=180)
    assert r0["weights"].keys() == r1["weights"].keys()
    for key, value in r0["weights"].items():
        assert torch.equal(value, r1["weights"][key]), f"replicas differ at {key}"
    losses = [h["train_loss"] for h in r0["history"]]
    assert losses[-1] < 0.5 * losses[0]
