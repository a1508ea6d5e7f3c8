"""Bad inputs are refused with a DevlayerError naming the value (issue 6, the B-list).

Each case goes through ``devlayer.init()`` (or the public call the user makes), mostly with
a two-rank environment: a rank that got that far would open the rendezvous store, so these
tests also prove that the error comes *before* any socket is opened (``rendezvous`` is
replaced by a tripwire, and the port is still free afterwards).

Covered elsewhere, not repeated here (see docs/reliability.md):

* B4 port in use: tests/dist/test_rendezvous.py::test_master_port_in_use_is_named_fast
* B5 unreachable master (127.0.0.1, a port nobody listens on; never off-machine):
  tests/dist/test_rendezvous.py::test_unreachable_master_names_address_and_port
* B6 SLURM without MASTER_*: tests/unit/test_launchers.py (derived address and port) and
  tests/e2e/test_launchers_e2e.py::test_slurm_shaped_env_two_plain_processes_derives_master
* B7 conflicting launcher variables: tests/unit/test_launchers.py
* B9 fewer processes than WORLD_SIZE: tests/dist/test_faults.py
"""

from __future__ import annotations

import math
import socket
from typing import Any

import pytest
import torch

import devlayer
from devlayer import lifecycle
from devlayer.testing import free_port, simulate


@pytest.fixture
def two_ranks(clean_env: pytest.MonkeyPatch) -> int:
    """This process is rank 0 of 2 (hand-set env); reaching the rendezvous fails the test.

    Returns:
        The MASTER_PORT, free when the test starts.
    """
    port = free_port()
    for key, value in {
        "RANK": "0",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "DEVLAYER_LAUNCHER": "env",
    }.items():
        clean_env.setenv(key, value)

    def tripwire(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("init() reached the rendezvous: a socket would be opened")

    clean_env.setattr(lifecycle, "rendezvous", tripwire)
    return port


def _assert_nothing_opened(port: int) -> None:
    assert not devlayer.is_initialized()
    assert not torch.distributed.is_initialized()
    with socket.socket() as s:  # nothing listens on MASTER_PORT (bind would fail: EADDRINUSE)
        s.bind(("127.0.0.1", port))


# --------------------------------------------------------------------------- B1


def test_b1_unknown_env_backend_names_value_and_registered_list(two_ranks, clean_env):
    """DEVLAYER_BACKEND='cdua' raises BackendNotFoundError whose exact message names the value,
    every registered backend and the suggestion 'cuda', before any socket is opened."""
    clean_env.setenv("DEVLAYER_BACKEND", "cdua")
    with pytest.raises(devlayer.errors.BackendNotFoundError) as info:
        devlayer.init()
    names = ", ".join(sorted(devlayer.backends.registered_backends()))
    assert str(info.value) == (
        f"DEVLAYER_BACKEND='cdua' is not a registered backend; registered: {names} "
        f"(did you mean 'cuda'?)"
    )
    _assert_nothing_opened(two_ranks)


def test_b1_unknown_backend_argument(two_ranks):
    """backend='tpu' as an argument raises BackendNotFoundError naming it as backend='tpu',
    before any socket is opened."""
    with pytest.raises(
        devlayer.errors.BackendNotFoundError, match=r"^backend='tpu' is not a registered"
    ):
        devlayer.init(backend="tpu")
    _assert_nothing_opened(two_ranks)


# --------------------------------------------------------------------------- B2


@pytest.mark.simulated
def test_b2_device_index_that_does_not_exist(two_ranks):
    """devices=[7] with 2 simulated cuda devices raises DeviceError naming the index and the
    device count, before any device is selected and before any socket is opened."""
    with simulate("cuda", 2) as fake, pytest.raises(devlayer.errors.DeviceError) as info:
        devlayer.init(backend="cuda", devices=[7])
    message = str(info.value)
    assert "devices=[7]" in message and "device(s) 7" in message
    assert "sees 2 cuda device(s)" in message
    assert fake.calls == []  # no device was even selected
    _assert_nothing_opened(two_ranks)


@pytest.mark.simulated
@pytest.mark.parametrize(
    ("spec", "shown"),
    [([0, 0], "devices=[0, 0] lists device 0 more than once"),
     ("1,1", "devices='1,1' lists device 1 more than once")],
)  # fmt: skip
def test_b2_duplicate_devices(two_ranks, spec, shown):
    """The same device listed twice ([0, 0] or "1,1") raises DeviceError naming the spec as
    given and the repeated index, before any socket is opened."""
    with simulate("cuda", 2), pytest.raises(devlayer.errors.DeviceError) as info:
        devlayer.init(backend="cuda", devices=spec)
    assert shown in str(info.value)
    _assert_nothing_opened(two_ranks)


@pytest.mark.simulated
def test_b2_devices_from_env_are_named_as_env(two_ranks, clean_env):
    """DEVLAYER_DEVICES=7 (no such device) raises DeviceError naming the variable, so the user
    sees the bad value came from the environment, before any socket is opened."""
    clean_env.setenv("DEVLAYER_DEVICES", "7")
    with simulate("cuda", 2), pytest.raises(devlayer.errors.DeviceError, match="DEVLAYER_DEVICES"):
        devlayer.init(backend="cuda")
    _assert_nothing_opened(two_ranks)


@pytest.mark.simulated
def test_b2_fewer_devices_than_local_ranks(two_ranks):
    """devices=[1] for 2 local ranks raises DeviceError saying 1 device is selected for 2 ranks
    on the node, before any socket, instead of putting both ranks on one device."""
    with simulate("cuda", 2), pytest.raises(devlayer.errors.DeviceError) as info:
        devlayer.init(backend="cuda", devices=[1])
    assert "selects 1 device(s) but 2 ranks run on this node" in str(info.value)
    _assert_nothing_opened(two_ranks)


# --------------------------------------------------------------------------- B3


@pytest.mark.parametrize("comm", ["nccl", "xccl"])
def test_b3_unavailable_comm_is_refused_before_any_socket(two_ranks, comm):
    """comm='nccl' / 'xccl' on a torch build without it raises BackendUnavailableError naming the
    comm and the fix comm='gloo', before any socket; it never switches to gloo silently."""
    from devlayer.registry import torch_comm_available as comm_available

    if comm_available(comm):
        pytest.skip(f"this torch build has {comm}")
    with pytest.raises(devlayer.BackendUnavailableError) as info:
        devlayer.init(backend="cpu", comm=comm)
    assert f"communication backend {comm!r} is not available for backend 'cpu'" in str(info.value)
    assert "comm='gloo'" in str(info.value)  # the fix, never a silent switch
    _assert_nothing_opened(two_ranks)


def test_b3_unavailable_comm_from_env(two_ranks, clean_env):
    """DEVLAYER_COMM=nccl on a torch build without nccl raises BackendUnavailableError before any
    socket, as the comm= argument does."""
    clean_env.setenv("DEVLAYER_COMM", "nccl")
    if torch.distributed.is_nccl_available():
        pytest.skip("this torch build has nccl")
    with pytest.raises(devlayer.BackendUnavailableError, match="'nccl' is not available"):
        devlayer.init(backend="cpu")
    _assert_nothing_opened(two_ranks)


@pytest.mark.simulated
def test_b3_cuda_without_nccl_never_falls_back_to_gloo(two_ranks):
    """Simulated cuda whose torch has only gloo: init(backend="cuda") raises
    BackendUnavailableError for nccl instead of silently running on gloo."""
    with (
        simulate("cuda", 2, comm=("gloo",)),
        pytest.raises(devlayer.BackendUnavailableError) as info,
    ):
        devlayer.init(backend="cuda")
    assert "communication backend 'nccl' is not available for backend 'cuda'" in str(info.value)
    _assert_nothing_opened(two_ranks)


@pytest.mark.simulated
def test_b3_xpu_without_xccl_or_ccl(two_ranks):
    """Simulated xpu whose torch has only gloo: init(backend="xpu") raises BackendUnavailableError
    saying neither xccl nor ccl is available, instead of silently running on gloo."""
    with (
        simulate("xpu", 2, comm=("gloo",)),
        pytest.raises(devlayer.BackendUnavailableError) as info,
    ):
        devlayer.init(backend="xpu")
    assert "neither xccl nor ccl" in str(info.value)
    _assert_nothing_opened(two_ranks)


# --------------------------------------------------------------------------- B8


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"RANK": "2"}, "RANK=2 is out of range for WORLD_SIZE=2; ranks run from 0 to 1"),
        ({"RANK": "-1"}, "RANK=-1 is out of range for WORLD_SIZE=2"),
        ({"RANK": "one"}, "RANK='one' is not an integer"),
        ({"RANK": "1.5"}, "RANK='1.5' is not an integer"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 is not a valid world size; it must be >= 1"),
        ({"WORLD_SIZE": "-2"}, "WORLD_SIZE=-2 is not a valid world size"),
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
        ({"LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK=3 is out of range"),
        ({"MASTER_PORT": "http"}, "MASTER_PORT='http' is not a port number"),
        ({"MASTER_PORT": "70000"}, "MASTER_PORT=70000 is out of range"),
        # the same checks under torchrun's variables
        ({"TORCHELASTIC_RUN_ID": "x", "LOCAL_RANK": "0", "RANK": "5"}, "RANK=5 is out of range"),
    ],
    ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else "",
)
def test_b8_bad_rank_and_world_values_are_named_before_any_socket(
    two_ranks, clean_env, env, fragment
):
    """Out-of-range, negative or non-integer RANK, WORLD_SIZE, LOCAL_RANK or MASTER_PORT (hand-set
    or under torchrun's variables) makes init() raise LaunchEnvError naming the variable and its
    value, before any socket is opened."""
    if "TORCHELASTIC_RUN_ID" in env:
        clean_env.delenv("DEVLAYER_LAUNCHER")
    for key, value in env.items():
        clean_env.setenv(key, value)
    with pytest.raises(devlayer.errors.LaunchEnvError) as info:
        devlayer.init(backend="cpu")
    assert fragment in str(info.value)
    _assert_nothing_opened(two_ranks)


# --------------------------------------------------------------------------- B10


@pytest.mark.parametrize(
    ("timeout", "fragment"),
    [
        (0, "timeout=0 must be a positive, finite number"),
        (-5, "timeout=-5 must be a positive"),
        (math.inf, "timeout=inf must be a positive, finite"),
        (math.nan, "timeout=nan must be a positive, finite"),
        ("30", "timeout='30' has type str"),
        (True, "timeout=True has type bool"),
        ([30], "timeout=[30] has type list"),
    ],
)
def test_b10_bad_timeout_is_named(two_ranks, timeout, fragment):
    """timeout= of 0, negative, inf, nan, a str, a bool or a list raises InvalidArgumentError
    naming the value (or its type), before any socket is opened."""
    with pytest.raises(devlayer.errors.InvalidArgumentError) as info:
        devlayer.init(backend="cpu", timeout=timeout)
    assert fragment in str(info.value)
    _assert_nothing_opened(two_ranks)


@pytest.mark.parametrize("value", ["soon", "0", "-1"])
def test_b10_bad_timeout_from_env_names_the_variable(two_ranks, clean_env, value):
    """A bad DEVLAYER_TIMEOUT ('soon', '0', '-1') raises InvalidArgumentError naming the variable
    and its value, before any socket is opened."""
    clean_env.setenv("DEVLAYER_TIMEOUT", value)
    # "0" is shown as 0.0 (parsed before the check): variable and number are named
    with pytest.raises(devlayer.errors.InvalidArgumentError, match=f"DEVLAYER_TIMEOUT='?{value}"):
        devlayer.init(backend="cpu")
    _assert_nothing_opened(two_ranks)


def test_b10_barrier_timeout_is_validated(clean_env):
    """barrier(timeout=...) refuses 0, -1 and "5" with InvalidArgumentError, as init() does."""
    with devlayer.init(backend="cpu"):
        for bad in (0, -1, "5"):
            with pytest.raises(devlayer.errors.InvalidArgumentError, match="timeout="):
                devlayer.barrier(timeout=bad)  # type: ignore[arg-type]


def test_b10_init_twice_same_args_is_idempotent_different_args_refused(clean_env):
    """A second init() with the same arguments returns the same State; with another timeout it
    raises DevlayerError naming both argument sets and leaves the first State in place."""
    first = devlayer.init(backend="cpu", timeout=30)
    try:
        assert devlayer.init(backend="cpu", timeout=30) is first
        with pytest.raises(devlayer.DevlayerError) as info:
            devlayer.init(backend="cpu", timeout=60)
        message = str(info.value)
        assert "already called with backend='cpu'" in message and "timeout=30" in message
        assert "now called with" in message and "timeout=60" in message
        assert "devlayer.shutdown() first" in message
        assert devlayer.state() is first  # the refused call changed nothing
    finally:
        devlayer.shutdown()


@pytest.mark.parametrize(
    "call",
    [
        lambda: devlayer.all_reduce(1.0),
        lambda: devlayer.all_gather(torch.ones(1)),
        lambda: devlayer.broadcast(torch.ones(1)),
        lambda: devlayer.barrier(),
        lambda: devlayer.all_gather_object("x"),
        lambda: devlayer.broadcast_object("x"),
        lambda: devlayer.rank(),
        lambda: devlayer.device(),
    ],
    ids=[
        "all_reduce",
        "all_gather",
        "broadcast",
        "barrier",
        "all_gather_object",
        "broadcast_object",
        "rank",
        "device",
    ],
)
def test_b10_collective_before_init_says_call_init(clean_env, call):
    """Every collective, rank() and device() called before init() raises NotInitializedError
    saying to call devlayer.init() first, not a torch error about the default process group."""
    with pytest.raises(devlayer.errors.NotInitializedError, match=r"call devlayer\.init\(\) first"):
        call()


def test_b10_shutdown_is_idempotent_and_says_whether_it_did_something(clean_env):
    """shutdown() returns False when nothing is initialized, True right after init(), and False
    again on a second call, without raising."""
    assert devlayer.shutdown() is False  # nothing initialized
    devlayer.init(backend="cpu")
    assert devlayer.shutdown() is True
    assert devlayer.shutdown() is False
    assert not devlayer.is_initialized()


def test_debug_flag_with_a_bad_value_is_named(clean_env):
    """init() reads every setting once, so a bad DEVLAYER_DEBUG is refused there, by name,
    before anything changed (it used to wait for the first collective)."""
    clean_env.setenv("DEVLAYER_DEBUG", "maybe")
    with pytest.raises(devlayer.errors.InvalidArgumentError, match="DEVLAYER_DEBUG='maybe'"):
        devlayer.init(backend="cpu")
    assert not devlayer.is_initialized()
