"""Issue 20, spawn, devices and init(): bad numbers refused before anything is built, one
device rule for init / launch / farm, requests compared after normalising, comm checked at
every world size, and device sharing on one visible device (no processes here; the real
runs are in tests/dist/test_spawn_requests.py and tests/e2e/test_spawn_torchrun.py)."""

from __future__ import annotations

import logging
import math
import multiprocessing.context
import os
from datetime import timedelta

import pytest

import devlayer
from devlayer import lifecycle
from devlayer.config import Settings
from devlayer.devices import plan_devices, usable_cpus
from devlayer.early import apply
from devlayer.errors import (
    BackendUnavailableError,
    DeviceError,
    DevlayerError,
    InvalidArgumentError,
)
from devlayer.launchers import detect
from devlayer.testing import launcher_env, simulate, torchrun_env


@pytest.fixture
def no_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building any spawn Process fails the test: a refusal must come before them."""

    def built(self: object, *args: object, **kwargs: object) -> None:
        raise AssertionError("spawn built a Process before checking its arguments")

    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "__init__", built)


# --------------------------------------------------------------------------- R5-S1, R5-S2


@pytest.mark.timeout(30)
def test_r5_s1_spawn_refuses_a_huge_nprocs_before_building_any_process(clean_env, no_processes):
    """spawn(nprocs=10**9) and one rank over max_nprocs() raise InvalidArgumentError naming
    nprocs and the limit, before a single Process object exists (was: a billion objects)."""
    from devlayer.multiproc import max_nprocs

    limit = max_nprocs(usable_cpus())
    for nprocs in (10**9, limit + 1):
        with pytest.raises(InvalidArgumentError) as err:
            devlayer.spawn(os.getpid, nprocs=nprocs)
        text = str(err.value)
        assert f"nprocs={nprocs}" in text and f"at most {limit}" in text, text
        assert "torchrun" in text and len(text) < 400


def test_r5_s1_the_limit_follows_the_cores_with_a_floor():
    """max_nprocs() allows 4 ranks per usable core and never fewer than 8."""
    from devlayer.multiproc import max_nprocs

    assert max_nprocs(1) == 8 and max_nprocs(2) == 8 and max_nprocs(16) == 64


@pytest.mark.timeout(30)
@pytest.mark.parametrize("devices", [range(10**12), range(10**20)])
def test_r5_s2_a_huge_device_list_is_a_short_device_error(clean_env, devices):
    """init(devices=range(10**12)) raises a short DeviceError naming the length and the
    limit, without copying the list (was: a bare MemoryError / OverflowError)."""
    with pytest.raises(DeviceError) as err:
        devlayer.init(backend="cpu", devices=devices)
    text = str(err.value)
    assert "range(0, " in text and "65536" in text and len(text) < 300, text
    assert not devlayer.is_initialized()


# --------------------------------------------------------------------------- R5-S4, R5-S5


def _cpu_plan(count: int, ranks: int, launched: bool = True):
    return plan_devices(
        count,
        device_type="cpu",
        visible=1,
        variable=None,
        env={},
        local_world_size=ranks,
        indexed=False,
        launched=launched,
    )


def test_r5_s4_a_count_on_cpu_is_a_count_of_ranks():
    """On cpu devices=N is N ranks sharing the cpu: accepted under N ranks, a DeviceError
    naming both numbers under any other number (was: 'this process sees 1')."""
    assert _cpu_plan(2, 2).indices is None
    assert _cpu_plan(1, 1).indices is None
    with pytest.raises(DeviceError) as err:
        _cpu_plan(2, 3)
    text = str(err.value)
    assert "devices=2" in text and "3 rank(s) run on this node" in text, text
    with pytest.raises(DeviceError, match=r"devlayer\.spawn"):
        _cpu_plan(2, 1, launched=False)  # plain python: still says how to start ranks


def _tail(message: str) -> str:
    """The message after the origin (``devices=``, ``--devices=``)."""
    return message.split("=", 1)[1]


def test_r5_s5_devices_1_3_on_cpu_is_one_error_for_init_launch_and_farm(clean_env, capsys):
    """init(devices="1,3"), `devlayer launch --devices 1,3` and `devlayer farm --devices 1,3`
    on cpu all refuse with the same DeviceError text (launch and farm ignored it before)."""
    from devlayer.cli import main
    from devlayer.farm import plan_slots

    with pytest.raises(DeviceError) as from_init:
        devlayer.init(backend="cpu", devices="1,3")
    with pytest.raises(DeviceError) as from_farm:
        plan_slots("cpu", "1,3")
    assert _tail(str(from_farm.value)) == _tail(str(from_init.value))
    assert "cpu device(s) 1, 3" in str(from_init.value)
    assert main(["launch", "--backend", "cpu", "--devices", "1,3", "job.py"]) != 0
    assert _tail(str(from_init.value)) in capsys.readouterr().err
    code = main(["farm", "--backend", "cpu", "--devices", "1,3", "--count", "1", "--", "true"])
    assert code != 0 and _tail(str(from_init.value)) in capsys.readouterr().err


def test_r5_s5_launch_and_farm_read_a_cpu_count_as_ranks_and_jobs(clean_env):
    """`devlayer launch --devices 2` on cpu starts 2 ranks (and refuses --nproc 3 with it);
    the farm runs 2 jobs side by side; index 0 still works everywhere."""
    import argparse

    from devlayer.cli import launch
    from devlayer.farm import plan_slots

    def planned(devices: str, nproc: str = "auto") -> int:
        args = argparse.Namespace(backend="cpu", devices=devices, nproc=nproc)
        return launch._plan_devices(args, dict(os.environ))[0]

    assert planned("2") == 2 and planned("0,") == 1 and planned("auto") == 1
    with pytest.raises(DeviceError, match="3 rank"):
        planned("2", nproc="3")
    assert len(plan_slots("cpu", 2)) == 2
    assert len(plan_slots("cpu", "0,", parallel=1)) == 1


# --------------------------------------------------------------------------- R5-S6


def _shared(be_name: str, comm: str | None, rank: int = 0) -> int | None:
    be = devlayer.backends.get_backend(be_name)
    info = detect(torchrun_env(rank, 2))
    plan = lifecycle._plan_devices(be, None, "devices", info)
    allow = Settings.from_env(os.environ).allow_shared_devices  # as init() reads it
    return lifecycle._pick_device(be, plan, info, comm, allow)


@pytest.mark.simulated
def test_r5_s6_two_ranks_on_the_only_device_error_with_nccl_and_warn_otherwise(sim, caplog):
    """Two ranks on a node with one cuda device: init() raises DeviceError with nccl (unless
    DEVLAYER_ALLOW_SHARED_DEVICES=1) and rank 0 warns with gloo (was: silence)."""
    with launcher_env("torchrun", 0, 2), simulate("cuda", 1, comm=("nccl", "gloo")):
        with pytest.raises(DeviceError) as err:
            devlayer.init(backend="cuda")
        assert "2 ranks run on this node but 1 cuda device(s)" in str(err.value)
        assert "DEVLAYER_ALLOW_SHARED_DEVICES=1" in str(err.value)
        assert not devlayer.is_initialized()
    lifecycle._shared_warned = False
    with simulate("cuda", 1), caplog.at_level(logging.WARNING, logger="devlayer"):
        assert _shared("cuda", "gloo") == 0
        sim.setenv("DEVLAYER_ALLOW_SHARED_DEVICES", "1")
        assert _shared("cuda", "nccl") == 0
    assert "ranks share devices" in caplog.text
    lifecycle._shared_warned = False


@pytest.mark.simulated
def test_r5_s6_one_device_bound_per_task_is_not_sharing(sim, caplog):
    """A scheduler's own one-device binding (CUDA_VISIBLE_DEVICES=3 per task) passes without
    a word; the same value set by devlayer (the marker) is the node's one device: an error."""
    sim.setenv("CUDA_VISIBLE_DEVICES", "3")
    lifecycle._shared_warned = False
    with simulate("cuda", 4), caplog.at_level(logging.WARNING, logger="devlayer"):
        assert _shared("cuda", "nccl") == 0
        assert caplog.text == ""
        sim.setenv("DEVLAYER_VISIBILITY_APPLIED", "CUDA_VISIBLE_DEVICES=3")
        with pytest.raises(DeviceError, match="share devices"):
            _shared("cuda", "nccl")


# --------------------------------------------------------------------------- R5-S7, R5-S8


@pytest.mark.simulated
def test_r5_s8_the_same_device_request_given_two_ways_is_the_same(sim):
    """init(devices="1,3") then init(devices=[1, 3]) (and 30 vs timedelta(seconds=30),
    "CUDA" vs "cuda") return the same State; [1, 2] is still refused."""
    with simulate("cuda", 4):
        st = devlayer.init(backend="cuda", devices="1,3", timeout=30)
        try:
            assert devlayer.init(backend="CUDA", devices=[1, 3], timeout=30.0) is st
            assert devlayer.init("cuda", (1, 3), timedelta(seconds=30)) is st
            assert devlayer.init("cuda", "[1,3]", 30) is st
        finally:
            devlayer.shutdown()


@pytest.mark.simulated
def test_r5_s8_a_normalised_request_still_refuses_a_different_one(sim):
    """After init(devices="1,3"), init(devices=[1, 2]) raises, naming both specs."""
    with simulate("cuda", 4):
        st = devlayer.init(backend="cuda", devices="1,3")
        try:
            assert devlayer.init(backend="cuda", devices=[1, 3]) is st
            with pytest.raises(DevlayerError) as err:
                devlayer.init(backend="cuda", devices=[1, 2])
            assert "devices=[1,3]" in str(err.value) and "devices=[1,2]" in str(err.value)
        finally:
            devlayer.shutdown()


def test_r5_s7_init_comm_agrees_with_the_same_comm_from_the_environment(clean_env):
    """DEVLAYER_COMM=gloo (what spawn(comm="gloo") gives a rank) then init(comm="GLOO") and
    init() are the same request; init() after init(comm="gloo") too (gloo is cpu's own)."""
    clean_env.setenv("DEVLAYER_COMM", "gloo")
    clean_env.setenv("DEVLAYER_BACKEND", "cpu")
    st = devlayer.init()
    try:
        assert devlayer.init(comm="GLOO") is st
        assert devlayer.init(backend="cpu", comm="gloo") is st
    finally:
        devlayer.shutdown()
    clean_env.delenv("DEVLAYER_COMM")
    st = devlayer.init(comm="gloo")
    try:
        assert devlayer.init() is st
    finally:
        devlayer.shutdown()


# --------------------------------------------------------------------------- R5-S9, R5-S10


def test_r5_s9_an_unavailable_comm_is_refused_at_world_size_one(clean_env):
    """init(comm=X) with X missing from this torch build raises BackendUnavailableError at
    world size 1 (as at 2), naming X and the available comms; so does DEVLAYER_COMM=X."""
    from devlayer.registry import torch_comm_available

    missing = next(c for c in ("nccl", "mpi", "ucc", "nonesuch") if not torch_comm_available(c))
    with pytest.raises(BackendUnavailableError) as err:
        devlayer.init(backend="cpu", comm=missing)
    assert f"{missing!r}" in str(err.value) and "available: 'gloo'" in str(err.value)
    clean_env.setenv("DEVLAYER_COMM", missing)
    with pytest.raises(BackendUnavailableError, match=f"DEVLAYER_COMM='{missing}'"):
        devlayer.init(backend="cpu")
    assert not devlayer.is_initialized()


@pytest.mark.parametrize("comm", ["", "  ", 5, b"gloo"])
def test_r5_s9_a_comm_that_is_not_a_name_is_refused(clean_env, comm):
    """comm="" / 5 / b"gloo" raise InvalidArgumentError naming comm= (was: accepted at
    world size 1)."""
    with pytest.raises(InvalidArgumentError, match="comm="):
        devlayer.init(backend="cpu", comm=comm)
    assert not devlayer.is_initialized()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "5", True, 0, -1, [5]])
def test_r5_s10_spawn_refuses_a_join_timeout_that_is_not_a_positive_number(
    clean_env, no_processes, bad
):
    """spawn(join_timeout=nan / inf / "5" / True / 0 / -1) raises InvalidArgumentError naming
    join_timeout before any process exists (nan meant: no timeout at all)."""
    with pytest.raises(InvalidArgumentError, match="join_timeout="):
        devlayer.spawn(os.getpid, nprocs=2, join_timeout=bad)


def test_r5_s10_spawn_checks_its_other_arguments_before_starting(clean_env, no_processes):
    """spawn(comm=5), spawn(devices="0,0") and a comm that env= sets otherwise are refused
    by name before any process exists."""
    with pytest.raises(InvalidArgumentError, match="comm=5"):
        devlayer.spawn(os.getpid, comm=5)  # type: ignore[arg-type]
    with pytest.raises(DeviceError, match="more than once"):
        devlayer.spawn(os.getpid, devices="0,0")
    with pytest.raises(InvalidArgumentError, match="DEVLAYER_COMM"):
        devlayer.spawn(os.getpid, comm="gloo", env={"DEVLAYER_COMM": "mpi"})


# --------------------------------------------------------------------------- R5-S11


@pytest.mark.simulated
def test_r5_s11_init_recognises_an_early_marker_that_names_several_variables(sim):
    """devlayer.early without DEVLAYER_BACKEND narrows every vendor and writes a marker with
    several entries; init() finds its own variable among them and does not narrow again
    (a marker compared as a whole would raise DeviceError for DEVLAYER_DEVICES=1,3)."""
    env = {"DEVLAYER_DEVICES": "1,3"}
    apply(env)
    assert ";" in env["DEVLAYER_VISIBILITY_APPLIED"]  # several variables in one marker
    for key, value in env.items():
        sim.setenv(key, value)
    with simulate("cuda", 4, initialized=True) as fake, devlayer.init(backend="cuda") as st:
        assert st.visibility == ("CUDA_VISIBLE_DEVICES", "1,3")
        assert fake.current == 0 and fake.device_count() == 2
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1,3"
