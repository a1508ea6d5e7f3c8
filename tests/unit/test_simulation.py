"""CUDA, ROCm, XPU and MPS through simulated runtimes (the one hardware seam).

Everything here runs through ``devlayer.init()`` at world size 1 where it can; the
multi-rank device mapping is tested through the internal helpers with ``ProcessInfo``
objects, because ``init()`` with several ranks would create a real process group.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from datetime import timedelta
from types import SimpleNamespace

import pytest

import devlayer
from devlayer import testing
from devlayer.errors import (
    BackendUnavailableError,
    DeviceError,
    DevlayerError,
    InitOrderError,
    InvalidArgumentError,
)
from devlayer.launchers import ProcessInfo, detect
from devlayer.testing import FakeRuntime, fake_for, simulate, torchrun_env

# The module that defines init() (devlayer.lifecycle), found without hard-coding its name.
lifecycle = importlib.import_module(devlayer.init.__module__)

VIS = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ZE_AFFINITY_MASK")


class EnvRecordingRuntime(FakeRuntime):
    """Records the visibility variables as they were when set_device was called."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.env_at_set_device: dict[str, str | None] = {}

    def set_device(self, index: int) -> None:
        self.env_at_set_device = {v: os.environ.get(v) for v in VIS}
        super().set_device(index)


def _cuda(count: int, **kwargs: object) -> EnvRecordingRuntime:
    kwargs.setdefault("visibility_var", "CUDA_VISIBLE_DEVICES")
    return EnvRecordingRuntime(count, comm=("nccl", "gloo"), vendor="cuda", **kwargs)


def _torch_default_device() -> str:
    import torch

    return str(torch.get_default_device())


# --------------------------------------------------------------------------- cuda, one rank


@pytest.mark.simulated
def test_simulated_cuda_auto_detected_over_cpu(sim: pytest.MonkeyPatch) -> None:
    before = _torch_default_device()
    with simulate("cuda", 4) as fake:
        assert devlayer.backends.available_backends()[:1] == ["cuda"]
        st = devlayer.init()
        assert st.backend == "cuda"
        assert str(st.device) == "cuda:0"
        assert st.device_index == 0
        assert st.comm is None  # world size 1: no process group
        assert st.visibility is None
        assert st.reason.startswith("auto-detected: 4 cuda device(s)")
        assert fake.calls == [("set_device", 0)]
        assert devlayer.device() == st.device
        # simulated devices cannot hold tensors: torch's default device stays put
        assert _torch_default_device() == before
        assert devlayer.shutdown()
    assert not devlayer.is_initialized()


@pytest.mark.simulated
def test_simulated_cuda_explicit_default_device_request_is_ignored(
    sim: pytest.MonkeyPatch,
) -> None:
    before = _torch_default_device()
    with simulate("cuda", 2), devlayer.init(backend="cuda", set_default_device=True) as st:
        assert str(st.device) == "cuda:0"
        assert _torch_default_device() == before


@pytest.mark.simulated
@pytest.mark.parametrize("devices", ["1,3", [1, 3], "[1,3]", (1, 3)])
def test_simulated_devices_narrow_cuda_visible_devices(
    sim: pytest.MonkeyPatch, devices: object
) -> None:
    fake = _cuda(4)
    with simulate("cuda", runtime=fake):
        st = devlayer.init(devices=devices)
        # narrowed before set_device, which then uses the first of the two visible devices
        assert fake.env_at_set_device["CUDA_VISIBLE_DEVICES"] == "1,3"
        assert fake.calls == [("set_device", 0)]
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "1,3"
        assert st.visibility == ("CUDA_VISIBLE_DEVICES", "1,3")
        assert str(st.device) == "cuda:0"
        assert devlayer.backends.get_backend("cuda").device_count() == 2
        assert "CUDA_VISIBLE_DEVICES=1,3" in os.environ[lifecycle.APPLIED_MARKER]
        devlayer.shutdown()
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    assert lifecycle.APPLIED_MARKER not in os.environ


@pytest.mark.simulated
def test_simulated_devices_count_and_env_spec(sim: pytest.MonkeyPatch) -> None:
    # A count above 1 needs that many ranks (issue 13): one process counts 1.
    with simulate("cuda", 4), devlayer.init(devices=1) as st:
        assert st.visibility == ("CUDA_VISIBLE_DEVICES", "0")
    sim.setenv("DEVLAYER_DEVICES", "2,3")
    with simulate("cuda", 4), devlayer.init() as st:
        assert st.visibility == ("CUDA_VISIBLE_DEVICES", "2,3")
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


@pytest.mark.simulated
def test_simulated_devices_compose_with_scheduler_visibility(sim: pytest.MonkeyPatch) -> None:
    sim.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    fake = _cuda(8)  # 8 physical GPUs, the scheduler gave this job 4..7
    with simulate("cuda", runtime=fake):
        assert devlayer.backends.get_backend("cuda").device_count() == 4
        with devlayer.init(devices="1,3") as st:
            assert st.visibility == ("CUDA_VISIBLE_DEVICES", "5,7")
            assert fake.env_at_set_device["CUDA_VISIBLE_DEVICES"] == "5,7"
            assert devlayer.backends.get_backend("cuda").device_count() == 2
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"


@pytest.mark.simulated
def test_simulated_missing_device_index(sim: pytest.MonkeyPatch) -> None:
    with simulate("cuda", 2) as fake:
        with pytest.raises(DeviceError) as info:
            devlayer.init(devices=[7])
        assert fake.calls == []
    msg = str(info.value)
    assert "devices=[7]" in msg
    assert "device(s) 7" in msg
    assert "sees 2 cuda device(s) (indices 0..1)" in msg
    assert not devlayer.is_initialized()
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


@pytest.mark.simulated
@pytest.mark.parametrize("devices", [[0, 0], "1,1", "0,1,0"])
def test_simulated_duplicate_devices(sim: pytest.MonkeyPatch, devices: object) -> None:
    with simulate("cuda", 4), pytest.raises(DeviceError, match="more than once"):
        devlayer.init(devices=devices)
    assert not devlayer.is_initialized()


@pytest.mark.simulated
def test_simulated_initialized_runtime_refuses_new_visibility(sim: pytest.MonkeyPatch) -> None:
    with simulate("cuda", 4, initialized=True) as fake:
        with pytest.raises(InitOrderError) as info:
            devlayer.init(devices="1,3")
        msg = str(info.value)
        assert "CUDA_VISIBLE_DEVICES='1,3'" in msg
        assert "devlayer.early" in msg
        assert "DEVLAYER_DEVICES" in msg
        assert fake.calls == []
        assert "CUDA_VISIBLE_DEVICES" not in os.environ
        assert not devlayer.is_initialized()
        # without a device restriction an initialized runtime is fine
        with devlayer.init() as st:
            assert str(st.device) == "cuda:0"


@pytest.mark.simulated
def test_simulated_early_narrowing_satisfies_initialized_runtime(
    sim: pytest.MonkeyPatch,
) -> None:
    from devlayer.early import apply

    env = {"DEVLAYER_DEVICES": "1,3", "DEVLAYER_BACKEND": "cuda"}
    for name, value in apply(env).items():
        sim.setenv(name, value)
    sim.setenv(lifecycle.APPLIED_MARKER, env[lifecycle.APPLIED_MARKER])
    sim.setenv("DEVLAYER_DEVICES", "1,3")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1,3"
    # the runtime started after devlayer.early narrowed visibility: nothing left to change
    with simulate("cuda", 4, initialized=True), devlayer.init() as st:
        assert st.visibility == ("CUDA_VISIBLE_DEVICES", "1,3")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1,3"  # early's value, not init's to undo


@pytest.mark.simulated
def test_simulated_failed_set_device_rolls_back_env(sim: pytest.MonkeyPatch) -> None:
    class Broken(FakeRuntime):
        def set_device(self, index: int) -> None:
            raise RuntimeError("CUDA error: out of memory")

    fake = Broken(4, comm=("nccl",), vendor="cuda", visibility_var="CUDA_VISIBLE_DEVICES")
    with simulate("cuda", runtime=fake), pytest.raises(RuntimeError, match="out of memory"):
        devlayer.init(devices="1,2")
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    assert lifecycle.APPLIED_MARKER not in os.environ
    assert not devlayer.is_initialized()


# --------------------------------------------------------------------------- rocm


@pytest.mark.simulated
def test_simulated_rocm_narrows_hip_visible_devices(sim: pytest.MonkeyPatch) -> None:
    with simulate("cuda", 4, variant="rocm"), devlayer.init(devices="1,3") as st:
        assert st.visibility == ("HIP_VISIBLE_DEVICES", "1,3")
        assert "CUDA_VISIBLE_DEVICES" not in os.environ
        assert devlayer.backends.get_backend("cuda").device_count() == 2
    assert "HIP_VISIBLE_DEVICES" not in os.environ


@pytest.mark.simulated
def test_simulated_rocm_narrows_the_variable_already_set(sim: pytest.MonkeyPatch) -> None:
    sim.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    with simulate("cuda", 4, variant="rocm"), devlayer.init(devices="1,3") as st:
        assert st.visibility == ("CUDA_VISIBLE_DEVICES", "1,3")
        assert "HIP_VISIBLE_DEVICES" not in os.environ
        assert devlayer.backends.get_backend("cuda").device_count() == 2
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    # HIP_VISIBLE_DEVICES wins when both are set (HIP reads it first)
    sim.setenv("HIP_VISIBLE_DEVICES", "2,3")
    with simulate("cuda", 4, variant="rocm"), devlayer.init(devices=[1]) as st:
        assert st.visibility == ("HIP_VISIBLE_DEVICES", "3")
        assert devlayer.backends.get_backend("cuda").device_count() == 1
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    assert os.environ["HIP_VISIBLE_DEVICES"] == "2,3"


# --------------------------------------------------------------------------- xpu


@pytest.mark.simulated
@pytest.mark.parametrize(
    ("comm", "expected"),
    [(("xccl", "ccl", "gloo"), "xccl"), (("xccl", "gloo"), "xccl"), (("ccl", "gloo"), "ccl")],
)
def test_simulated_xpu_comm_choice(
    sim: pytest.MonkeyPatch, comm: tuple[str, ...], expected: str
) -> None:
    with simulate("xpu", 2, comm=comm):
        assert devlayer.backends.get_backend("xpu").comm_backend() == expected


@pytest.mark.simulated
def test_simulated_xpu_without_xccl_or_ccl(sim: pytest.MonkeyPatch) -> None:
    for name, value in torchrun_env(0, 2, master_port=1).items():
        sim.setenv(name, value)
    with simulate("xpu", 2, comm=("gloo",)) as fake:
        with pytest.raises(BackendUnavailableError) as info:
            devlayer.init()  # two ranks: fails before any rendezvous
        assert fake.calls == []
    msg = str(info.value)
    assert "neither xccl nor ccl" in msg
    assert "torch >= 2.8 built for XPU" in msg
    assert "intel-extension-for-pytorch" in msg
    assert "oneccl_bind_pt" in msg
    assert not devlayer.is_initialized()


@pytest.mark.simulated
def test_simulated_xpu_requested_comm_missing(sim: pytest.MonkeyPatch) -> None:
    with simulate("xpu", 2, comm=("xccl",)), pytest.raises(BackendUnavailableError) as info:
        devlayer.backends.get_backend("xpu").comm_backend("ccl")
    assert "communication backend 'ccl' is not available for backend 'xpu'" in str(info.value)


@pytest.mark.simulated
def test_simulated_xpu_device_and_affinity_mask(sim: pytest.MonkeyPatch) -> None:
    with simulate("xpu", 2) as fake, devlayer.init() as st:
        assert (st.backend, str(st.device)) == ("xpu", "xpu:0")
        assert fake.calls == [("set_device", 0)]
    with simulate("xpu", 2), devlayer.init(devices=[1]) as st:
        assert st.visibility == ("ZE_AFFINITY_MASK", "1")
    assert "ZE_AFFINITY_MASK" not in os.environ


@pytest.mark.simulated
@pytest.mark.parametrize(
    ("devices", "mask"), [("0,2", "0.0,1.0"), ([1], "0.1"), ("0,1", "0.0,0.1"), ("2,0", "1.0,0.0")]
)
def test_simulated_xpu_tile_mask_narrowed_by_index(
    sim: pytest.MonkeyPatch, devices: object, mask: str
) -> None:
    sim.setenv("ZE_AFFINITY_MASK", "0.0,0.1,1.0")  # three tiles of two cards
    with simulate("xpu", 2):
        assert devlayer.backends.get_backend("xpu").device_count() == 3
        with devlayer.init(devices=devices) as st:
            assert st.visibility == ("ZE_AFFINITY_MASK", mask)
            assert os.environ["ZE_AFFINITY_MASK"] == mask
            assert str(st.device) == "xpu:0"
        with pytest.raises(DeviceError, match=r"device\(s\) 3, but this process sees 3"):
            devlayer.init(devices="0,3")
    assert os.environ["ZE_AFFINITY_MASK"] == "0.0,0.1,1.0"


def _xpu_module() -> object:
    return importlib.import_module(type(devlayer.backends.get_backend("xpu").backend).__module__)


def _fake_packages(sim: pytest.MonkeyPatch, ipex_version: str | None) -> list[str]:
    """Pretend IPEX ``ipex_version`` is installed (None: not installed); record imports."""
    xpu = _xpu_module()
    helpers = importlib.import_module("devlayer.backends._ipex")
    imported: list[str] = []
    fake_importlib = SimpleNamespace(import_module=imported.append)
    sim.setattr(helpers, "installed_version", lambda dist: ipex_version)
    sim.setattr(helpers, "importlib", fake_importlib)
    sim.setattr(xpu, "importlib", fake_importlib)
    return imported


def test_xpu_prepare_ccl_rejects_ipex_torch_mismatch(sim: pytest.MonkeyPatch) -> None:
    import torch

    xpu = _xpu_module()
    imported = _fake_packages(
        sim, "2.8.10+xpu" if not torch.__version__.startswith("2.8") else "2.7.0"
    )
    with pytest.raises(BackendUnavailableError) as info:
        devlayer.backends.get_backend("xpu").prepare("ccl")
    msg = str(info.value)
    assert msg.startswith("comm 'ccl': intel-extension-for-pytorch ")
    assert torch.__version__ in msg
    assert f"{xpu.IPEX_DIST}=={xpu.minor(torch.__version__)}.*" in msg  # type: ignore[attr-defined]
    assert imported == []  # refused before importing anything


def test_xpu_prepare_ccl_imports_ipex_then_bindings(sim: pytest.MonkeyPatch) -> None:
    import torch

    xpu = _xpu_module()
    imported = _fake_packages(sim, xpu.minor(torch.__version__) + ".10+xpu")  # type: ignore[attr-defined]
    devlayer.backends.get_backend("xpu").prepare("ccl")
    assert imported == [xpu.IPEX_MODULE, xpu.CCL_MODULE]  # type: ignore[attr-defined]
    imported.clear()
    devlayer.backends.get_backend("xpu").prepare("xccl")
    assert imported == []


def test_xpu_prepare_ccl_missing_modules(sim: pytest.MonkeyPatch) -> None:
    import torch

    xpu = _xpu_module()
    helpers = importlib.import_module("devlayer.backends._ipex")
    sim.setattr(helpers, "installed_version", lambda dist: None)
    with pytest.raises(BackendUnavailableError, match="comm 'ccl' needs oneccl_bindings"):
        devlayer.backends.get_backend("xpu").prepare("ccl")
    # IPEX metadata present but the module does not import: named, not a bare ImportError
    matching = xpu.minor(torch.__version__) + ".0+xpu"  # type: ignore[attr-defined]
    sim.setattr(helpers, "installed_version", lambda dist: matching)
    with pytest.raises(BackendUnavailableError, match="intel_extension_for_pytorch"):
        devlayer.backends.get_backend("xpu").prepare("ccl")


@pytest.mark.simulated
def test_simulated_xpu_unavailable_names_ipex_without_xpu_torch(sim: pytest.MonkeyPatch) -> None:
    sim.setattr(_xpu_module(), "_installed", lambda module: True)
    with simulate("xpu", 2, compiled=False):
        avail = devlayer.backends.get_backend("xpu").availability()
    assert not avail
    assert "intel_extension_for_pytorch is installed but torch has no XPU" in avail.reason


# --------------------------------------------------------------------------- DEVLAYER_SIMULATE


@pytest.mark.simulated
def test_simulated_via_env_spec(sim: pytest.MonkeyPatch) -> None:
    sim.setenv("DEVLAYER_SIMULATE", "cuda:4")
    fakes = testing.runtimes_from_spec("cuda:4")
    assert set(fakes) == {"cuda"}
    assert devlayer.backends.get_backend("cuda").runtime is fakes["cuda"]
    assert devlayer.backends.get_backend("cuda").device_count() == 4
    with devlayer.init(devices="2,3") as st:
        assert (st.backend, str(st.device)) == ("cuda", "cuda:0")
        assert fakes["cuda"].calls == [("set_device", 0)]
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


@pytest.mark.simulated
def test_simulated_env_spec_with_comm(sim: pytest.MonkeyPatch) -> None:
    sim.setenv("DEVLAYER_SIMULATE", "xpu:2:ccl+gloo, cuda:0")
    assert devlayer.backends.available_backends()[:1] == ["xpu"]
    assert devlayer.backends.get_backend("xpu").comm_backend() == "ccl"
    assert devlayer.backends.get_backend("cuda").device_count() == 0


def test_simulate_env_spec_bad_count(sim: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidArgumentError, match=r"DEVLAYER_SIMULATE='cuda:x'.*'x'"):
        testing.runtimes_from_spec("cuda:x")


# --------------------------------------------------------------------------- mps


@pytest.mark.simulated
def test_simulated_mps_single_process(sim: pytest.MonkeyPatch) -> None:
    with simulate("mps", 1), devlayer.init() as st:
        assert (st.backend, str(st.device), st.device_index) == ("mps", "mps", None)
    for name, value in torchrun_env(0, 2, master_port=1).items():
        sim.setenv(name, value)
    with simulate("mps", 1), pytest.raises(DeviceError) as info:
        devlayer.init()
    msg = str(info.value)
    assert "backend 'mps' runs a single process" in msg
    assert "2 ranks" in msg
    assert "DEVLAYER_BACKEND=cpu" in msg


# --------------------------------------------------------------------------- several ranks


def _info(local_rank: int, local_world_size: int) -> ProcessInfo:
    return ProcessInfo(
        rank=local_rank,
        world_size=local_world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        master_port=29500,
        launcher="env",
    )


@pytest.mark.simulated
@pytest.mark.parametrize("local_rank", range(8))
def test_simulated_rank_mapping_wraps_local_rank(sim: pytest.MonkeyPatch, local_rank: int) -> None:
    with simulate("cuda", 4):
        be = devlayer.backends.get_backend("cuda")
        info = _info(local_rank, 8)
        plan = lifecycle._plan_devices(be, None, "devices", info)
        assert lifecycle._pick_device(be, plan, info) == local_rank % 4


@pytest.mark.simulated
def test_simulated_rank_mapping_from_launcher_env(
    sim: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    env = {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "5",
        "LOCAL_WORLD_SIZE": "8",
        "MASTER_PORT": "29511",
    }
    info = detect(env)
    assert (info.launcher, info.local_rank) == ("env", 5)
    with simulate("cuda", 4), caplog.at_level(logging.WARNING, logger="devlayer"):
        be = devlayer.backends.get_backend("cuda")
        plan = lifecycle._plan_devices(be, None, "devices", info)
        assert lifecycle._pick_device(be, plan, info) == 1
    # Sharing is reported once, by rank 0 (tests/unit/test_lifecycle.py), not by rank 5.
    assert caplog.text == ""
    caplog.clear()
    # one device per task (scheduler binding): every local rank uses index 0, no warning
    sim.setenv("CUDA_VISIBLE_DEVICES", "0")
    with simulate("cuda", 1), caplog.at_level(logging.WARNING, logger="devlayer"):
        be = devlayer.backends.get_backend("cuda")
        plan = lifecycle._plan_devices(be, None, "devices", info)
        assert lifecycle._pick_device(be, plan, info) == 0
    assert caplog.text == ""


@pytest.mark.simulated
def test_simulated_rank_mapping_after_visibility(sim: pytest.MonkeyPatch) -> None:
    be_name, info = "cuda", detect(torchrun_env(5, 8))
    with simulate(be_name, 8):
        be = devlayer.backends.get_backend(be_name)
        undo = lifecycle._Undo()
        try:
            spec = (7, 6, 5, 4, 3, 2, 1, 0)
            plan = lifecycle._plan_devices(be, spec, "devices", info)
            vis = lifecycle._apply_visibility(be, plan, undo)
            assert vis == ("CUDA_VISIBLE_DEVICES", "7,6,5,4,3,2,1,0")
            assert lifecycle._pick_device(be, plan, info) == 5  # physical GPU 2
        finally:
            lifecycle._restore(undo)
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


@pytest.mark.simulated
def test_simulated_device_list_shorter_than_local_ranks(sim: pytest.MonkeyPatch) -> None:
    with simulate("cuda", 4):
        be = devlayer.backends.get_backend("cuda")
        with pytest.raises(DeviceError) as info:
            lifecycle._plan_devices(be, (0, 1), "DEVLAYER_DEVICES", _info(5, 8))
    msg = str(info.value)
    assert "DEVLAYER_DEVICES=[0,1] selects 2 device(s) but 8 ranks run on this node" in msg


@pytest.mark.simulated
def test_simulated_no_visible_devices_after_visibility(sim: pytest.MonkeyPatch) -> None:
    sim.setenv("CUDA_VISIBLE_DEVICES", "")
    with simulate("cuda", 0):
        be = devlayer.backends.get_backend("cuda")
        with pytest.raises(DeviceError, match="sees no devices"):
            info = _info(0, 1)
            lifecycle._pick_device(be, lifecycle._plan_devices(be, None, "devices", info), info)


# --------------------------------------------------------------------------- init arguments


@pytest.mark.simulated
def test_simulated_init_is_idempotent(sim: pytest.MonkeyPatch) -> None:
    with simulate("cuda", 4) as fake:
        st = devlayer.init(devices=[0, 1], timeout=30)
        assert devlayer.init(devices=[0, 1], timeout=30) is st
        assert fake.calls == [("set_device", 0)]  # the second call did nothing
        with pytest.raises(DevlayerError) as info:
            devlayer.init(devices=[0, 2], timeout=30)
        msg = str(info.value)
        assert "devices=[0,1]" in msg
        assert "devices=[0,2]" in msg
        assert "devlayer.shutdown()" in msg
        assert devlayer.state() is st  # the failed call changed nothing
        assert st.timeout == timedelta(seconds=30)
        devlayer.shutdown()


@pytest.mark.parametrize("timeout", [0, -1, "x", True, float("inf"), float("nan"), [5]])
def test_init_rejects_bad_timeout(clean_env: pytest.MonkeyPatch, timeout: object) -> None:
    with pytest.raises(InvalidArgumentError, match=re.escape(f"timeout={timeout!r}")):
        devlayer.init(backend="cpu", timeout=timeout)  # type: ignore[arg-type]
    assert not devlayer.is_initialized()


def test_init_timeout_from_env(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("DEVLAYER_TIMEOUT", "45")
    with devlayer.init(backend="cpu") as st:
        assert st.timeout == timedelta(seconds=45)
    with devlayer.init(backend="cpu", timeout=timedelta(minutes=2)) as st:
        assert st.timeout == timedelta(minutes=2)
    clean_env.setenv("DEVLAYER_TIMEOUT", "soon")
    with pytest.raises(InvalidArgumentError, match="DEVLAYER_TIMEOUT='soon'"):
        devlayer.init(backend="cpu")


@pytest.mark.simulated
def test_simulated_fake_for_vendor_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda, xpu = fake_for("cuda", 2), fake_for("xpu", 2)
    assert cuda.visibility_var == "CUDA_VISIBLE_DEVICES"
    assert xpu.visibility_var == "ZE_AFFINITY_MASK"
    # The defaults come from the backends (their visibility_vars; torch's comm for the device).
    assert cuda.visibility_vars == devlayer.backends.get_backend("cuda").visibility_vars
    # A ROCm fake reads HIP_VISIBLE_DEVICES, and CUDA_VISIBLE_DEVICES on top of it.
    rocm = fake_for("cuda", 4, variant="rocm")
    assert {"HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"} <= set(rocm.visibility_vars)
    monkeypatch.setenv("HIP_VISIBLE_DEVICES", "1,2,3")
    assert rocm.device_count() == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,2")
    assert rocm.device_count() == 2
    assert cuda.comm_available("nccl") and not cuda.comm_available("xccl")
    assert xpu.comm_available("xccl")


@pytest.mark.simulated
def test_simulated_xpu_ccl_local_rank_variables_only_for_ccl():
    from devlayer.launchers import ProcessInfo

    be = devlayer.backends.get_backend("xpu")
    info = ProcessInfo(
        rank=3,
        world_size=4,
        local_rank=1,
        local_world_size=2,
        num_nodes=2,
        node_rank=1,
        master_port=29500,
    )
    # prepare() sets them (only where unset) before it imports the oneCCL bindings, which
    # are not installed here.
    env: dict[str, str] = {"CCL_LOCAL_SIZE": "mine"}
    with pytest.raises(BackendUnavailableError):
        be.prepare("ccl", info, env)
    assert env == {"CCL_LOCAL_RANK": "1", "CCL_LOCAL_SIZE": "mine"}
    env = {}
    be.prepare("xccl", info, env)
    devlayer.backends.get_backend("cuda").prepare("nccl", info, env)
    assert env == {}
