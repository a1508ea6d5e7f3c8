"""Accelerator hooks (the Pty-Chi pattern) and ``Trainer(optimize=...)`` without IPEX.

Libraries that keep their own "accelerator module" get it from ``init`` through
``accelerator_hooks`` / ``DEVLAYER_ACCELERATOR_HOOKS``; vendor optimizations are asked for
by name through the backend. The IPEX path itself runs for real in tests/ipex (tox -e ipex).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset

import devlayer
from devlayer.errors import BackendUnavailableError, DevlayerError, InvalidArgumentError
from devlayer.testing import simulate
from tests.helpers import subprocess_env, toy_trainer

HAVE_IPEX = importlib.util.find_spec("intel_extension_for_pytorch") is not None


@pytest.fixture
def hook_module(sim: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """An importable module ``devlayer_hook_target`` that records what it was given."""
    (tmp_path / "devlayer_hook_target.py").write_text(
        textwrap.dedent(
            """
            seen = []
            def set_torch_accelerator_module(module):
                seen.append(module)
            def broken(module):
                raise RuntimeError("no such device family")
            NOT_CALLABLE = 3
            """
        )
    )
    sim.syspath_prepend(str(tmp_path))
    sim.delitem(sys.modules, "devlayer_hook_target", raising=False)
    mod = importlib.import_module("devlayer_hook_target")
    yield mod
    sys.modules.pop("devlayer_hook_target", None)


# --------------------------------------------------------------------------- hooks


@pytest.mark.simulated
def test_simulated_xpu_hook_gets_torch_xpu(sim: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []
    with simulate("xpu", 2), devlayer.init(accelerator_hooks=[seen.append]):
        assert seen == [torch.xpu]
        assert devlayer.accelerator_module() is torch.xpu


@pytest.mark.simulated
def test_simulated_cuda_hook_by_env_name(sim: pytest.MonkeyPatch, hook_module: Any) -> None:
    sim.setenv("DEVLAYER_ACCELERATOR_HOOKS", "devlayer_hook_target:set_torch_accelerator_module")
    with simulate("cuda", 1), devlayer.init():
        assert hook_module.seen == [torch.cuda]


def test_cpu_hook_gets_torch_cpu_and_is_called_once(sim: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []
    with devlayer.init(backend="cpu", accelerator_hooks=seen.append):
        devlayer.init(backend="cpu", accelerator_hooks=seen.append)  # same State, no re-run
        assert seen == [torch.cpu]
        assert devlayer.accelerator_module() is torch.cpu


def test_empty_hooks_opt_out_of_the_variable(sim: pytest.MonkeyPatch, hook_module: Any) -> None:
    sim.setenv("DEVLAYER_ACCELERATOR_HOOKS", "devlayer_hook_target:set_torch_accelerator_module")
    with devlayer.init(backend="cpu", accelerator_hooks=()):
        assert hook_module.seen == []


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("set_torch_accelerator_module", "neither a callable nor 'package.module:function'"),
        ("devlayer_no_such_module:f", "cannot be loaded"),
        ("devlayer_hook_target:missing", "cannot be loaded"),
        ("devlayer_hook_target:NOT_CALLABLE", "is a int, not a function"),
    ],
)
def test_bad_hook_names_are_refused_before_anything_changes(
    sim: pytest.MonkeyPatch, hook_module: Any, entry: str, expected: str
) -> None:
    sim.setenv("DEVLAYER_ACCELERATOR_HOOKS", entry)
    with pytest.raises(InvalidArgumentError) as info:
        devlayer.init(backend="cpu")
    assert f"DEVLAYER_ACCELERATOR_HOOKS entry {entry!r}" in str(info.value)
    assert expected in str(info.value)
    assert not devlayer.is_initialized()


@pytest.mark.simulated
def test_failing_hook_names_itself_and_init_rolls_back(
    sim: pytest.MonkeyPatch, hook_module: Any
) -> None:
    before = dict(os.environ)
    with simulate("xpu", 2), pytest.raises(DevlayerError) as info:
        devlayer.init(devices=[1], accelerator_hooks=["devlayer_hook_target:broken"])
    msg = str(info.value)
    assert "accelerator hook devlayer_hook_target:broken raised RuntimeError" in msg
    assert "no such device family" in msg and "torch.xpu" in msg
    assert not devlayer.is_initialized()
    assert dict(os.environ) == before  # ZE_AFFINITY_MASK put back


def test_accelerator_module_needs_init(sim: pytest.MonkeyPatch) -> None:
    with pytest.raises(DevlayerError, match="init"):
        devlayer.accelerator_module()


# --------------------------------------------------------------------------- optimize=


def _data() -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=gen)
    return TensorDataset(x, x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]))


def _trainer(net: torch.nn.Module, opt: torch.optim.Optimizer, **kw: Any) -> devlayer.Trainer:
    return toy_trainer(net, opt, batch_size=16, resume=None, **kw)


def test_optimize_callable_runs_once_before_training(sim: pytest.MonkeyPatch) -> None:
    net = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    calls: list[tuple[Any, Any]] = []
    replacement = torch.optim.SGD(net.parameters(), lr=0.1)
    steps = []
    replacement.register_step_post_hook(lambda *_: steps.append(1))

    def optimize(model: Any, optimizer: Any) -> tuple[Any, Any]:
        calls.append((model, optimizer))
        return model, replacement

    trainer = _trainer(net, opt, optimize=optimize, max_epochs=2)
    with devlayer.init(backend="cpu"):
        trainer.fit(_data())
        trainer.fit(_data())  # a second fit (already at max_epochs) does not optimize again
    assert calls == [(net, opt)]
    assert trainer.optimizer is replacement
    assert len(steps) == 4 * 2  # 64 samples / 16 per step, 2 epochs


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (None, "returned NoneType; it must return a (model, optimizer) tuple"),
        (("model", None), "returned a str as the model"),
    ],
)
def test_optimize_callable_with_a_wrong_result(
    sim: pytest.MonkeyPatch, result: Any, expected: str
) -> None:
    net = torch.nn.Linear(4, 1)
    trainer = _trainer(net, torch.optim.SGD(net.parameters(), lr=0.1), optimize=lambda m, o: result)
    with devlayer.init(backend="cpu"), pytest.raises(InvalidArgumentError) as info:
        trainer.fit(_data())
    assert expected in str(info.value)


def test_optimize_of_a_wrong_type_is_refused_at_construction() -> None:
    net = torch.nn.Linear(4, 1)
    names = re.escape("(devlayer.train.optimize.optimization_names())")
    with pytest.raises(InvalidArgumentError, match=r"optimize=42: use the name of a .* " + names):
        _trainer(net, torch.optim.SGD(net.parameters(), lr=0.1), optimize=42)


def test_optimize_name_the_backend_does_not_know(sim: pytest.MonkeyPatch) -> None:
    net = torch.nn.Linear(4, 1)
    trainer = _trainer(net, torch.optim.SGD(net.parameters(), lr=0.1), optimize="tensorrt")
    with devlayer.init(backend="cpu"), pytest.raises(InvalidArgumentError) as info:
        trainer.fit(_data())
    assert "optimize='tensorrt' is not available on backend 'cpu'" in str(info.value)


@pytest.mark.skipif(HAVE_IPEX, reason="IPEX is installed here; tests/ipex covers the real path")
def test_optimize_ipex_without_ipex_names_the_package(sim: pytest.MonkeyPatch) -> None:
    net = torch.nn.Linear(4, 1)
    trainer = _trainer(net, torch.optim.SGD(net.parameters(), lr=0.1), optimize="ipex")
    with devlayer.init(backend="cpu"), pytest.raises(BackendUnavailableError) as info:
        trainer.fit(_data())
    msg = str(info.value)
    assert "optimize='ipex' needs intel-extension-for-pytorch, which is not installed" in msg
    minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    assert f"intel-extension-for-pytorch=={minor}.*" in msg


def test_optimize_ipex_version_mismatch_stops_before_importing(sim: pytest.MonkeyPatch) -> None:
    ipex_helpers = importlib.import_module("devlayer.backends._ipex")
    sim.setattr(ipex_helpers, "installed_version", lambda dist: "2.8.0")
    imported: list[str] = []
    sim.setattr(ipex_helpers, "importlib", SimpleNamespace(import_module=imported.append))
    if torch.__version__.startswith("2.8."):
        sim.setattr(torch, "__version__", "2.13.0+cpu")
    net = torch.nn.Linear(4, 1)
    trainer = _trainer(net, torch.optim.SGD(net.parameters(), lr=0.1), optimize="ipex")
    with devlayer.init(backend="cpu"), pytest.raises(BackendUnavailableError) as info:
        trainer.fit(_data())
    msg = str(info.value)
    assert f"intel-extension-for-pytorch 2.8.0 does not match torch {torch.__version__}" in msg
    assert "torch==2.8.*" in msg
    assert imported == []


def test_optimize_ipex_names_the_backends_it_serves() -> None:
    from devlayer.train.optimize import apply_optimization

    with pytest.raises(InvalidArgumentError) as info:
        apply_optimization("ipex", None, None, backend="cuda", dtype=torch.float32)
    msg = str(info.value)
    assert "optimize='ipex' is not available on backend 'cuda'" in msg
    assert "'ipex' works on the cpu and xpu backends" in msg


def test_registered_optimization_runs_by_name(sim: pytest.MonkeyPatch) -> None:
    from devlayer.train import optimize as opt_mod

    seen: list[tuple[str, Any]] = []

    def mine(model: Any, optimizer: Any, *, backend: Any, dtype: Any) -> tuple[Any, Any]:
        seen.append((backend.name, dtype))
        return model, optimizer

    try:
        opt_mod.register_optimization("mine", mine)
        with pytest.raises(InvalidArgumentError, match="already registered"):
            opt_mod.register_optimization("mine", mine)
        net = torch.nn.Linear(4, 1)
        trainer = _trainer(net, torch.optim.SGD(net.parameters(), lr=0.1), optimize="mine")
        with devlayer.init(backend="cpu"):
            trainer.fit(_data())
    finally:
        opt_mod.OPTIMIZATIONS.pop("mine", None)
    assert seen == [("cpu", torch.float32)]


def test_the_ipex_optimization_registers_itself_from_backends() -> None:
    """train/ names no backend module: the table of named optimizations starts empty and
    ``"ipex"`` appears when a backend module that serves it is imported (a fresh process,
    so nothing loaded the backends before)."""
    code = (
        "import sys; from devlayer.train.optimize import OPTIMIZATIONS; "
        "assert 'ipex' not in OPTIMIZATIONS and 'devlayer.backends.cpu' not in sys.modules, "
        "OPTIMIZATIONS; import devlayer.backends.cpu; "
        "print(OPTIMIZATIONS['ipex'].__module__)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "devlayer.backends._ipex"


def test_registering_a_vendor_name_is_refused_before_the_vendors_load() -> None:
    """The user's ``register_optimization`` loads the vendors first, so ``"ipex"`` is taken
    even in a process that has not selected a backend yet (a fresh process)."""
    code = (
        "from devlayer.train.optimize import register_optimization\n"
        "try:\n"
        "    register_optimization('ipex', lambda m, o, **kw: (m, o))\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(
        "InvalidArgumentError an optimization named 'ipex' is already registered"
    ), proc.stdout


def test_a_backend_method_named_optimize_is_not_an_optimization() -> None:
    """Named optimizations come only from devlayer.train.optimize: the 0.1.0 vendor hook
    ``Backend.optimize`` is removed, so a backend's own method is never called."""
    from devlayer.train.optimize import apply_optimization

    class Legacy(devlayer.backends.Backend):
        name, device_type = "legacy-opt", "cpu"

        def optimize(self, *args: Any, **kwargs: Any) -> Any:
            raise AssertionError("a backend method is not an optimization")

    devlayer.backends.register_backend(Legacy)
    try:
        with pytest.raises(InvalidArgumentError, match="optimize='turbo' is not available"):
            apply_optimization("turbo", None, None, backend="legacy-opt", dtype=torch.float32)
    finally:
        devlayer.backends.unregister_backend("legacy-opt")


def _fake_ipex(sim: pytest.MonkeyPatch) -> list[str]:
    """IPEX simulated at its import: installed at torch's version, ``optimize`` a no-op that
    records its calls (the real package runs in tests/ipex)."""
    ipex_helpers = importlib.import_module("devlayer.backends._ipex")
    sim.setattr(ipex_helpers, "installed_version", lambda dist: torch.__version__)
    calls: list[str] = []

    def optimize(model: Any, optimizer: Any = None, **kw: Any) -> tuple[Any, Any]:
        calls.append(type(model).__name__)
        return model, optimizer

    fake = SimpleNamespace(optimize=optimize)
    sim.setattr(ipex_helpers, "importlib", SimpleNamespace(import_module=lambda name: fake))
    return calls


def test_d26_1_optimize_ipex_warns_of_its_end_of_life(sim: pytest.MonkeyPatch) -> None:
    """D26-1: ``Trainer(optimize="ipex")`` still runs (simulated IPEX) and warns once with an
    ``EndOfLifeWarning`` that names IPEX's end of life (last release 2.8, development ended
    2025-10-10, repository archived 2026-03-30) and the replacement (stock torch's
    ``torch.xpu`` and ``xccl`` from torch 2.8, ``compile=True``)."""
    from devlayer.errors import EndOfLifeWarning

    calls = _fake_ipex(sim)
    net = torch.nn.Linear(4, 1)
    trainer = _trainer(net, torch.optim.SGD(net.parameters(), lr=0.1), optimize="ipex")
    with devlayer.init(backend="cpu"), pytest.warns(EndOfLifeWarning) as record:
        trainer.fit(_data())
    assert calls == ["Linear"]
    (warning,) = [w for w in record if issubclass(w.category, EndOfLifeWarning)]
    text = str(warning.message)
    for part in ("end of life", "2.8 was its last release", "2025-10-10", "2026-03-30"):
        assert part in text, text
    assert "torch.xpu" in text and "xccl" in text and "compile=True" in text


def test_d26_1_a_callable_optimization_does_not_warn(sim: pytest.MonkeyPatch) -> None:
    """D26-1: only the IPEX optimization warns; ``optimize=None`` and a callable do not."""
    import warnings

    from devlayer.errors import EndOfLifeWarning

    net = torch.nn.Linear(4, 1)
    trainer = _trainer(net, torch.optim.SGD(net.parameters(), lr=0.1), optimize=lambda m, o: (m, o))
    with devlayer.init(backend="cpu"), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(_data())
    assert not [w for w in record if issubclass(w.category, EndOfLifeWarning)]
