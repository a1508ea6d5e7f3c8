"""The backend registry: built-ins, entry points, selection precedence and its errors."""

from __future__ import annotations

import importlib.metadata
import json
import re
import textwrap
import warnings
from collections.abc import Iterator

import pytest

import devlayer
from devlayer import registry
from devlayer.errors import (
    BackendNotFoundError,
    BackendUnavailableError,
    DevlayerError,
    InvalidArgumentError,
)
from devlayer.registry import select_backend
from devlayer.testing import simulate
from tests.helpers import ROOT, run_py

BUILTIN_ORDER = ["cuda", "xpu", "mps", "cpu"]


def _real_accelerator() -> bool:
    names = ("cuda", "xpu", "mps")
    return any(registry._safe_availability(devlayer.backends.get_backend(n)) for n in names)


@pytest.fixture
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """An empty registry that loads the built-ins again; the real one comes back after."""
    monkeypatch.setattr(registry, "_backends", {})
    monkeypatch.setattr(registry, "_loaded_builtins", False)
    monkeypatch.setattr(registry, "_loaded_entry_points", False)
    monkeypatch.setattr(registry, "_entry_point_errors", {})
    yield


def _fake_entry_points(
    monkeypatch: pytest.MonkeyPatch, *eps: importlib.metadata.EntryPoint
) -> None:
    def entry_points(**params: str) -> list[importlib.metadata.EntryPoint]:
        assert params == {"group": registry.ENTRY_POINT_GROUP}
        return list(eps)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


def _ep(name: str, value: str) -> importlib.metadata.EntryPoint:
    return importlib.metadata.EntryPoint(name=name, value=value, group=registry.ENTRY_POINT_GROUP)


class DemoBackend(devlayer.backends.Backend):
    """A CPU-device backend for registration tests (priority below cpu)."""

    name = "demo"
    priority = -5
    device_type = "cpu"

    def make_runtime(self) -> devlayer.backends.Runtime:
        from devlayer.testing import FakeRuntime

        return FakeRuntime(1)


# --------------------------------------------------------------------------- built-ins


def test_registered_builtins_in_priority_order(clean_env: pytest.MonkeyPatch) -> None:
    names = list(devlayer.backends.registered_backends())
    assert [n for n in names if n in BUILTIN_ORDER] == BUILTIN_ORDER
    priorities = [b.priority for b in devlayer.backends.registered_backends().values()]
    assert priorities == sorted(priorities, reverse=True)


def test_registered_builtins_exactly_without_plugins(
    clean_env: pytest.MonkeyPatch, fresh_registry: None
) -> None:
    _fake_entry_points(clean_env)
    assert list(devlayer.backends.registered_backends()) == BUILTIN_ORDER
    assert registry.entry_point_errors() == {}


def test_available_backends_is_cpu_only_here(clean_env: pytest.MonkeyPatch) -> None:
    if _real_accelerator():
        pytest.skip("this machine has a real accelerator")
    assert devlayer.backends.available_backends() == ["cpu"]


# --------------------------------------------------------------------------- selection


@pytest.mark.simulated
def test_selection_precedence_simulated(clean_env: pytest.MonkeyPatch) -> None:
    with simulate("cuda", 2), simulate("xpu", 2):
        # auto: highest priority available
        assert select_backend(None, env={}).backend.name == "cuda"
        assert select_backend("auto", env={}).backend.name == "cuda"
        # DEVLAYER_BACKEND beats auto-detection
        assert select_backend(None, env={"DEVLAYER_BACKEND": "xpu"}).backend.name == "xpu"
        # "auto" as the argument defers to DEVLAYER_BACKEND, like None (init()'s contract)
        assert select_backend("auto", env={"DEVLAYER_BACKEND": "xpu"}).backend.name == "xpu"
        # the explicit argument beats DEVLAYER_BACKEND
        sel = select_backend("cpu", env={"DEVLAYER_BACKEND": "xpu"})
        assert sel.backend.name == "cpu"
        assert sel.reason == "backend='cpu'"
        # DEVLAYER_BACKEND=auto (or blank) auto-detects
        assert select_backend(None, env={"DEVLAYER_BACKEND": "auto"}).backend.name == "cuda"
        assert select_backend(None, env={"DEVLAYER_BACKEND": " "}).backend.name == "cuda"
        # names are case- and space-insensitive
        assert select_backend(" XPU ", env={}).backend.name == "xpu"


def test_selection_reads_os_environ_by_default(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("DEVLAYER_BACKEND", "cpu")
    sel = select_backend()
    assert sel.backend.name == "cpu"
    assert "DEVLAYER_BACKEND" in sel.reason


@pytest.mark.simulated
def test_auto_detection_reports_skipped_backends_simulated(clean_env: pytest.MonkeyPatch) -> None:
    with simulate("cuda", 0), simulate("xpu", 1, compiled=False), simulate("mps", 0):
        sel = select_backend(None, env={})
    assert sel.backend.name == "cpu"
    skipped = dict(sel.skipped)
    assert skipped["cuda"] == "no CUDA devices visible"
    assert skipped["xpu"].startswith("torch built without XPU")
    assert "cuda: no CUDA devices visible" in sel.reason


def test_misspelt_env_backend_names_registered_and_suggests(
    clean_env: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(BackendNotFoundError) as info:
        select_backend(None, env={"DEVLAYER_BACKEND": "cdua"})
    msg = str(info.value)
    assert msg.startswith("DEVLAYER_BACKEND='cdua' is not a registered backend")
    assert "registered: cpu, cuda, mps, xpu" in msg
    assert "did you mean 'cuda'?" in msg
    assert isinstance(info.value, LookupError)


def test_comm_name_as_backend_gets_a_hint(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(BackendNotFoundError) as info:
        select_backend("nccl", env={})
    msg = str(info.value)
    assert "backend='nccl' is not a registered backend" in msg
    assert "communication backend" in msg
    assert "backend='cuda'" in msg


def test_explicit_cuda_without_cuda_build_raises(clean_env: pytest.MonkeyPatch) -> None:
    import torch

    if torch.backends.cuda.is_built():
        pytest.skip("torch here is built with CUDA")
    with pytest.raises(BackendUnavailableError) as info:
        select_backend("cuda", env={})
    assert "torch built without CUDA" in str(info.value)
    assert "backend='cuda' was requested" in str(info.value)


@pytest.mark.simulated
def test_explicit_unavailable_backend_never_falls_back_simulated(
    clean_env: pytest.MonkeyPatch,
) -> None:
    with simulate("cuda", 4, compiled=False):
        assert select_backend(None, env={}).backend.name != "cuda"  # auto skips it...
        with pytest.raises(BackendUnavailableError, match="torch built without CUDA"):
            select_backend("cuda", env={})  # ...an explicit choice does not
        with pytest.raises(BackendUnavailableError, match="DEVLAYER_BACKEND='cuda'"):
            select_backend(None, env={"DEVLAYER_BACKEND": "cuda"})
    with simulate("cuda", 0), pytest.raises(BackendUnavailableError, match="no CUDA devices"):
        select_backend("cuda", env={})


def test_init_with_unknown_env_backend(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("DEVLAYER_BACKEND", "no-such-backend")
    with pytest.raises(BackendNotFoundError) as info:
        devlayer.init()
    msg = str(info.value)
    assert "'no-such-backend'" in msg
    for name in BUILTIN_ORDER:
        assert name in msg
    assert not devlayer.is_initialized()


# --------------------------------------------------------------------------- registration


def test_register_duplicate_needs_replace(
    clean_env: pytest.MonkeyPatch, fresh_registry: None
) -> None:
    first = devlayer.backends.register_backend(DemoBackend)
    assert devlayer.backends.get_backend("demo").backend is first
    assert list(devlayer.backends.registered_backends())[-1] == "demo"  # priority -5: last

    with pytest.raises(DevlayerError, match=r"'demo' is already registered.*replace=True"):
        devlayer.backends.register_backend(DemoBackend)
    assert devlayer.backends.get_backend("demo").backend is first

    second = DemoBackend()
    assert devlayer.backends.register_backend(second, replace=True) is second
    assert devlayer.backends.get_backend("demo").backend is second

    # a built-in is protected the same way
    class FakeCuda(DemoBackend):
        name = "cuda"

    with pytest.raises(DevlayerError, match="'cuda' is already registered"):
        devlayer.backends.register_backend(FakeCuda)


def test_unregister(clean_env: pytest.MonkeyPatch, fresh_registry: None) -> None:
    devlayer.backends.register_backend(DemoBackend)
    devlayer.backends.unregister_backend("demo")
    assert "demo" not in devlayer.backends.registered_backends()
    with pytest.raises(BackendNotFoundError, match="'demo'"):
        devlayer.backends.get_backend("demo")
    devlayer.backends.unregister_backend("demo")  # unknown names are ignored
    devlayer.backends.unregister_backend("cpu")
    assert list(devlayer.backends.registered_backends()) == ["cuda", "xpu", "mps"]


def test_registered_backend_selectable_by_init(
    clean_env: pytest.MonkeyPatch, fresh_registry: None
) -> None:
    devlayer.backends.register_backend(DemoBackend)
    with devlayer.init(backend="demo") as st:
        assert (st.backend, str(st.device), st.comm) == ("demo", "cpu", None)
    assert select_backend(None, env={}).backend.name != "demo"  # never auto-detected


@pytest.mark.parametrize(
    ("name", "device_type", "fragment"),
    [
        ("", "cpu", "must set the class attributes"),
        ("x", "", "must set the class attributes"),
        ("MyNpu", "cpu", "name='MyNpu'"),
        (" pad ", "cpu", "name=' pad '"),
        ("auto", "cpu", "name='auto'"),
    ],
)
def test_register_rejects_unselectable_names(
    clean_env: pytest.MonkeyPatch,
    fresh_registry: None,
    name: str,
    device_type: str,
    fragment: str,
) -> None:
    bad = type("Bad", (DemoBackend,), {"name": name, "device_type": device_type})
    with pytest.raises(InvalidArgumentError, match=re.escape(fragment)):
        devlayer.backends.register_backend(bad)


def test_register_rejects_non_backends(clean_env: pytest.MonkeyPatch, fresh_registry: None) -> None:
    with pytest.raises(InvalidArgumentError, match=r"expected a devlayer\.backends\.Backend"):
        devlayer.backends.register_backend(object())  # type: ignore[arg-type]


# --------------------------------------------------------------------------- entry points


def test_broken_entry_points_do_not_break_builtins(
    clean_env: pytest.MonkeyPatch, fresh_registry: None
) -> None:
    _fake_entry_points(
        clean_env,
        _ep("broken", "devlayer_no_such_module_xyz:Backend"),
        _ep("notabackend", "string:ascii_letters"),
        _ep("cuda", f"{__name__}:DemoBackend"),  # shadows a built-in
        _ep("demo", f"{__name__}:DemoBackend"),  # a good one
    )
    names = list(devlayer.backends.registered_backends())
    assert [n for n in names if n in BUILTIN_ORDER] == BUILTIN_ORDER
    assert "demo" in names
    assert type(devlayer.backends.get_backend("cuda").backend).__name__ == "CudaBackend"
    assert devlayer.backends.available_backends()[-2:] == ["cpu", "demo"]

    errors = registry.entry_point_errors()
    assert set(errors) == {"broken", "notabackend", "cuda"}
    assert errors["broken"].startswith("ModuleNotFoundError")
    assert "expected a devlayer.backends.Backend" in errors["notabackend"]
    assert "already registered" in errors["cuda"]

    # asking for the broken plugin says why it is missing
    with pytest.raises(BackendNotFoundError) as info:
        devlayer.backends.get_backend("broken")
    assert "'broken' is not a registered backend" in str(info.value)
    assert "plugin failed to load: ModuleNotFoundError" in str(info.value)
    with devlayer.init(backend="cpu") as st:
        assert st.backend == "cpu"


def test_entry_point_name_must_match_backend_name(
    clean_env: pytest.MonkeyPatch, fresh_registry: None
) -> None:
    _fake_entry_points(clean_env, _ep("democpu", f"{__name__}:DemoBackend"))
    names = devlayer.backends.registered_backends()
    assert "democpu" not in names
    assert "demo" not in names
    err = registry.entry_point_errors()["democpu"]
    assert "named 'demo'" in err
    assert "must equal Backend.name" in err


def test_failing_entry_point_listing_does_not_break_builtins(
    clean_env: pytest.MonkeyPatch, fresh_registry: None
) -> None:
    def entry_points(**params: str) -> list[importlib.metadata.EntryPoint]:
        raise ValueError("bad metadata")

    clean_env.setattr(importlib.metadata, "entry_points", entry_points)
    assert list(devlayer.backends.registered_backends()) == BUILTIN_ORDER
    assert "ValueError: bad metadata" in registry.entry_point_errors()["<entry points>"]


# --------------------------------------------------------------------------- import cost


def test_import_devlayer_loads_no_backend_and_no_torch() -> None:
    code = textwrap.dedent(
        """
        import json, os, sys
        before = dict(os.environ)
        import devlayer
        devlayer.DevlayerError, devlayer.__version__
        print(json.dumps({
            "torch": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")),
            "backends": sorted(m for m in sys.modules if m.startswith("devlayer.backends.")),
            "registry": "devlayer.registry" in sys.modules,
            "env_changed": dict(os.environ) != before,
        }))
        """
    )
    proc = run_py(["-c", code], timeout=60)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {"torch": [], "backends": [], "registry": False, "env_changed": False}


# --------------------------------------------------------------------------- the interface


def test_derived_members_of_the_builtins() -> None:
    """indexed follows visibility_vars; default comm is torch's map (gloo where none)."""
    from torch.distributed import Backend as TorchBackend

    backends = devlayer.backends.registered_backends()
    assert [n for n, b in backends.items() if b.indexed] == ["cuda", "xpu"]
    assert backends["cpu"].default_comm() == "gloo"
    assert backends["mps"].default_comm() == TorchBackend.default_device_backend_map.get(
        "mps", "gloo"
    )
    assert backends["cuda"].default_comm() == "nccl"


@pytest.mark.parametrize(("name", "owner"), [("nccl", "cuda"), ("gloo", "cpu"), ("mpi", "cpu")])
def test_comm_names_map_to_the_backend_torch_says(name: str, owner: str) -> None:
    assert registry.comm_owner(name, devlayer.backends.registered_backends()) == owner
    assert registry.comm_owner("cdua", devlayer.backends.registered_backends()) is None


def _readme_backend_members() -> set[str]:
    """The Backend members docs/plugins.md's table names (what a vendor defines)."""
    text = (ROOT / "docs" / "plugins.md").read_text()
    section = text[: text.index("The runtime (`devlayer.backends.Runtime`)")]
    return set(re.findall(r"^\| `(\w+)", section, flags=re.MULTILINE))


def test_the_backend_interface_is_the_one_readme_lists() -> None:
    """Backend's public names are exactly docs/plugins.md's: the 0.1.0 hooks (install_hint,
    comm_hint, comm_env, optimize) are removed, not deprecated (CHANGELOG.md)."""
    public = {n for n in dir(devlayer.backends.Backend) if not n.startswith("_")}
    assert public == _readme_backend_members()


def test_a21_p1_the_vendor_class_has_at_most_12_documented_names() -> None:
    """The class a vendor subclasses has at most 12 public names, none of them one the library
    derives (device_count, set_device, device, comm_backend... live on BoundBackend), and each
    is documented: a method by a one-line docstring summary, a declaration in the class's
    Attributes section."""
    from devlayer.registry import BoundBackend
    from devlayer.vendor import Backend

    public = sorted(n for n in dir(Backend) if not n.startswith("_"))
    assert len(public) <= 12, public
    derived = {"runtime", "indexed", "comm_backend", "comm_available", "device_count"}
    derived |= {"set_device", "device", "default_comm", "shares_devices_between_ranks"}
    assert not derived & set(public)
    assert derived <= set(dir(BoundBackend))
    attributes = (Backend.__doc__ or "").split("Attributes:")[1]
    for name in public:
        member = getattr(Backend, name)
        if callable(member):
            summary = (member.__doc__ or "").strip().splitlines()
            assert summary and summary[0].endswith((".", "?")), name
        else:
            assert f"\n        {name}: " in attributes, name


@pytest.mark.simulated
def test_a21_p2_a_lookup_binds_the_runtime_once(clean_env: pytest.MonkeyPatch) -> None:
    """The runtime (simulated or real) is decided when a lookup binds the backend, not read
    from the simulation on every access: a backend looked up inside simulate() keeps its fake
    after the block, and a lookup after it gets the real runtime, made once and shared."""
    with simulate("cuda", 3) as fake:
        bound = devlayer.backends.get_backend("cuda")
        assert bound.simulated and bound.runtime is fake
    assert bound.runtime is fake and bound.device_count() == 3
    after = devlayer.backends.get_backend("cuda")
    assert not after.simulated and after.runtime is not fake
    assert devlayer.backends.get_backend("cuda").runtime is after.runtime


def test_a21_p3_a_runtime_missing_a_declared_member_is_named(
    clean_env: pytest.MonkeyPatch, fresh_registry: None
) -> None:
    """A plugin runtime without the declared ``variant``/``bind_device_id`` (written before
    they were declared) is an InvalidArgumentError naming the missing members and the fix,
    not an AttributeError deep inside init(). The members checked are the protocol's own."""
    from devlayer.vendor import RUNTIME_MEMBERS, Runtime

    assert set(RUNTIME_MEMBERS) == {n for n in dir(Runtime) if not n.startswith("_")}

    class Bare:
        def compiled(self) -> bool:
            return True

        def device_count(self) -> int:
            return 1

        def is_initialized(self) -> bool:
            return False

        def set_device(self, index: int) -> None:
            return None

        def device_name(self, index: int) -> str:
            return "bare"

    class Old(DemoBackend):
        name = "old-runtime"

        def make_runtime(self) -> devlayer.backends.Runtime:
            return Bare()  # type: ignore[return-value]

    devlayer.backends.register_backend(Old)
    with pytest.raises(InvalidArgumentError) as info:
        devlayer.backends.get_backend("old-runtime").device_count()
    msg = str(info.value)
    assert "'old-runtime'" in msg and "Bare" in msg and "variant, bind_device_id" in msg
    assert "subclass devlayer.backends.Runtime" in msg


def test_a_one_argument_prepare_is_not_adapted(clean_env: pytest.MonkeyPatch) -> None:
    """``prepare(comm, process, env)`` is the one interface: a plugin with the 0.1.0
    ``prepare(comm)`` fails loudly (TypeError) instead of being called another way."""
    from devlayer.launchers import ProcessInfo
    from devlayer.registry import prepare_comm

    class Old(devlayer.backends.Backend):
        name, device_type = "old-style", "cpu"

        def prepare(self, comm: str) -> None:  # type: ignore[override]
            raise AssertionError("not called with one argument")

    info = ProcessInfo(rank=0, world_size=2, local_rank=1, local_world_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(TypeError, match="prepare"):
            prepare_comm(registry.BoundBackend(Old()), "gloo", info, {}.__setitem__)


def test_prepare_comm_sets_variables_through_the_recorder(clean_env: pytest.MonkeyPatch) -> None:
    from devlayer.launchers import ProcessInfo
    from devlayer.registry import prepare_comm

    class Env(devlayer.backends.Backend):
        name, device_type = "env-demo", "cpu"

        def prepare(self, comm, process=None, env=None):  # type: ignore[no-untyped-def]
            assert env is not None and process is not None
            env.setdefault("ENV_DEMO_RANK", str(process.local_rank))
            env.setdefault("ENV_DEMO_KEPT", "devlayer's")

    clean_env.setenv("ENV_DEMO_KEPT", "user's")
    seen: dict[str, str] = {}
    info = ProcessInfo(rank=0, world_size=2, local_rank=1, local_world_size=2)
    prepare_comm(registry.BoundBackend(Env()), "gloo", info, seen.__setitem__)
    assert seen == {"ENV_DEMO_RANK": "1"}


def test_float_dtype_asks_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """float64 where torch allocates it; float32 where it refuses with a TypeError (MPS)."""
    import torch

    from devlayer.torchcompat import float_dtype

    assert float_dtype(torch.device("cpu")) is torch.float64

    def refuse(*args: object, **kwargs: object) -> None:
        raise TypeError("Cannot convert a MPS Tensor to float64 dtype")

    monkeypatch.setattr(torch, "empty", refuse)
    assert float_dtype(torch.device("meta")) is torch.float32

    def unreachable(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Torch not compiled with this device")

    monkeypatch.setattr(torch, "empty", unreachable)
    assert float_dtype(torch.device("meta")) is torch.float64


def test_a_checkout_without_an_install_is_told_to_install(monkeypatch):
    """The top-level backends/ folder becomes devlayer.backends only through an install
    (no import-time sys.modules hook): without one, the error says so and what to run."""
    from devlayer import registry

    real = registry.importlib.import_module

    def missing(name: str, *args: object) -> object:
        if name.startswith("devlayer.backends"):
            raise ModuleNotFoundError(f"No module named {name!r}", name="devlayer.backends")
        return real(name, *args)

    monkeypatch.setattr(registry, "_loaded_builtins", False)
    monkeypatch.setattr(registry, "_backends", {})
    monkeypatch.setattr(registry.importlib, "import_module", missing)
    with pytest.raises(devlayer.DevlayerError, match=r"pip install -e \."):
        registry._load_builtins()
