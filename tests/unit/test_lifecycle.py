"""Environment, devices and timeouts: issue 14 (items 7, 8, 10) and issue 13 (items 4-6, 8).

Unit level: device counts and hardware come from the simulated runtime (the one seam);
multi-rank environments are hand-set variables. Where ``init()`` would open the rendezvous
store, the ``two_ranks`` fixture replaces it with a tripwire, so an error proves it came
before any socket.
"""

from __future__ import annotations

import logging
import warnings
from datetime import timedelta
from typing import Any

import pytest

import devlayer
from devlayer import lifecycle
from devlayer.config import parse_timeout
from devlayer.devices import check_exists, parse_devices
from devlayer.errors import DeviceError, InvalidArgumentError, LaunchEnvError
from devlayer.launchers import detect
from devlayer.testing import free_port, intelmpi_env, openmpi_env, simulate
from tests.helpers import run_py, subprocess_env

WEEK = 7 * 24 * 3600


def _set(monkeypatch: pytest.MonkeyPatch, **env: object) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))


@pytest.fixture
def two_ranks(clean_env: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Rank 0 of 2 (hand-set env); reaching the rendezvous fails the test."""
    _set(
        clean_env,
        RANK=0,
        WORLD_SIZE=2,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=free_port(),
        DEVLAYER_LAUNCHER="env",
    )

    def tripwire(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("init() reached the rendezvous: a socket would be opened")

    clean_env.setattr(lifecycle, "rendezvous", tripwire)
    return clean_env


# --------------------------------------------------------------------------- 14.7 huge counts


@pytest.mark.simulated
@pytest.mark.timeout(30)
@pytest.mark.parametrize("count", [10**9, 10**18])
def test_huge_device_count_argument_is_refused_without_building_a_list(clean_env, count):
    # Before: tuple(range(10**9)) was built (OOM-killed at 23.8 GB).
    with simulate("cuda", 2), pytest.raises(DeviceError) as info:
        devlayer.init(backend="cuda", devices=count)
    msg = str(info.value)
    assert len(msg) < 400, msg
    assert f"a count of {count}" in msg and "sees 2 cuda device(s)" in msg


@pytest.mark.timeout(30)
def test_huge_device_count_from_env_gives_a_short_message(clean_env):
    clean_env.setenv("DEVLAYER_DEVICES", "99999")
    with pytest.raises(DeviceError) as info:
        devlayer.init(backend="cpu")
    msg = str(info.value)
    assert len(msg) < 400, len(msg)  # before: 689,017 characters
    assert "DEVLAYER_DEVICES=99999" in msg and "a count of 99999" in msg


def test_check_exists_long_index_list_names_a_few_and_counts_the_rest():
    with pytest.raises(DeviceError) as info:
        check_exists(tuple(range(3, 5000)), 2, device_type="cuda")
    msg = str(info.value)
    assert len(msg) < 400, len(msg)
    assert "3, 4, 5" in msg and "4997 in all" in msg


@pytest.mark.timeout(30)
def test_long_duplicate_free_index_list_parses_in_linear_time():
    # list.count() per entry was quadratic: 10**5 entries took minutes.
    spec = ",".join(map(str, range(100_000)))
    assert parse_devices(spec) == tuple(range(100_000))


@pytest.mark.simulated
@pytest.mark.timeout(30)
def test_farm_refuses_a_huge_count_briefly(clean_env):
    from devlayer.farm import plan_slots

    with simulate("cuda", 2), pytest.raises(DeviceError) as info:
        plan_slots("cuda", 10**9, env={})
    assert len(str(info.value)) < 400 and "a count of 1000000000" in str(info.value)


# --------------------------------------------------------------------------- 14.8 timeouts


@pytest.mark.parametrize(
    "value",
    [1e14, 1e300, 8e13, WEEK + 1, timedelta(days=8), timedelta.max, 10**400],
    ids=["1e14", "1e300", "8e13", "week+1s", "8days", "timedelta.max", "10**400"],
)
def test_timeout_above_a_week_is_refused_by_name(two_ranks, value):
    with pytest.raises(InvalidArgumentError) as info:
        devlayer.init(backend="cpu", timeout=value)
    msg = str(info.value)
    assert msg.startswith("timeout=") and "604800" in msg, msg


@pytest.mark.parametrize("value", ["1e14", "1e300", "8e13", "700000", "nan", "inf", "-inf", "0"])
def test_timeout_variable_out_of_range_names_the_variable(two_ranks, value):
    two_ranks.setenv("DEVLAYER_TIMEOUT", value)
    with pytest.raises(InvalidArgumentError) as info:
        devlayer.init(backend="cpu")
    assert str(info.value).startswith(f"DEVLAYER_TIMEOUT={value!r}"), str(info.value)


@pytest.mark.parametrize("value", [1e-300, timedelta(microseconds=0.1)])
def test_timeout_that_rounds_to_zero_is_refused(two_ranks, value):
    with pytest.raises(InvalidArgumentError, match="positive"):
        devlayer.init(backend="cpu", timeout=value)


@pytest.mark.parametrize("value", [WEEK, timedelta(days=7), 0.5, "604800"])
def test_timeouts_up_to_a_week_are_accepted(clean_env, value):
    if isinstance(value, str):
        assert parse_timeout(value, origin="DEVLAYER_TIMEOUT") == timedelta(days=7)
    else:
        assert parse_timeout(value) == (
            value if isinstance(value, timedelta) else timedelta(seconds=value)
        )


def test_barrier_timeout_is_bounded_too(clean_env):
    with devlayer.init(backend="cpu"), pytest.raises(InvalidArgumentError, match="604800"):
        devlayer.barrier(timeout=1e14)


# --------------------------------------------------------------------------- 14.10 inputs


@pytest.mark.parametrize("value", [1, 2.5, b"cpu", ["cpu"], object()])
def test_backend_of_the_wrong_type_is_named(clean_env, value):
    with pytest.raises(InvalidArgumentError) as info:
        devlayer.init(backend=value)  # type: ignore[arg-type]
    assert f"backend={value!r}" in str(info.value) and "a backend name" in str(info.value)


@pytest.mark.parametrize("spec", ["0,,1", ",1", "[0,,1]", "1,,", ",", "[,]"])
def test_empty_entries_in_a_device_list_are_refused(spec):
    with pytest.raises(DeviceError, match="empty entry"):
        parse_devices(spec, origin="DEVLAYER_DEVICES")


@pytest.mark.parametrize(("spec", "parsed"), [("1,", (1,)), ("[1,]", (1,)), ("0, 1", (0, 1))])
def test_one_trailing_comma_still_marks_an_index_list(spec, parsed):
    assert parse_devices(spec) == parsed


@pytest.mark.parametrize("spec", ["\u0661", "\u0661,\u0662", "\uff12", "0,\u0663", "\u00b2"])
def test_non_ascii_digits_are_refused(spec):
    with pytest.raises(DeviceError) as info:
        parse_devices(spec, origin="DEVLAYER_DEVICES")
    assert "DEVLAYER_DEVICES=" in str(info.value) and "0-9" in str(info.value)


def test_non_ascii_digits_in_a_list_argument_are_refused():
    with pytest.raises(DeviceError, match="0-9"):
        parse_devices(["\u0661"])


def test_local_rank_out_of_range_of_an_assumed_local_size_says_where_it_came_from():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "5", "MASTER_PORT": "29500"}
    with pytest.raises(LaunchEnvError) as info:
        detect(env)
    msg = str(info.value)
    assert "default=2" not in msg, msg
    assert "LOCAL_RANK=5" in msg and "LOCAL_WORLD_SIZE is not set" in msg
    assert "WORLD_SIZE=2" in msg


def test_openmpi_and_mpich_variables_that_disagree_are_a_named_conflict():
    env = {**openmpi_env(0, 2), **intelmpi_env(1, 4)}
    with pytest.raises(LaunchEnvError) as info:
        detect(env)
    msg = str(info.value)
    assert "conflicting launcher variables" in msg
    assert "OMPI_COMM_WORLD_RANK=0" in msg and "PMI_RANK=1" in msg
    assert "DEVLAYER_LAUNCHER" in msg


def test_agreeing_mpi_variables_are_not_a_conflict():
    env = {**openmpi_env(1, 2), **intelmpi_env(1, 2)}
    info = detect(env)
    assert (info.launcher, info.rank, info.world_size) == ("openmpi", 1, 2)


def test_forced_launcher_skips_the_mpi_conflict_check():
    env = {**openmpi_env(0, 2), **intelmpi_env(1, 4), "DEVLAYER_LAUNCHER": "mpich"}
    assert detect(env).rank == 1


# --------------------------------------------------------------------------- 13.4 devices=N


_PLAIN = (
    "import devlayer\n"
    "try:\n"
    "    devlayer.init(backend='cpu', devices={spec})\n"
    "except devlayer.DevlayerError as exc:\n"
    "    print('ERROR', type(exc).__name__, exc)\n"
    "else:\n"
    "    print('OK', devlayer.world_size(), devlayer.device())\n"
)


@pytest.mark.timeout(120)
def test_devices_count_above_one_from_plain_python_says_how_to_start_ranks():
    proc = run_py(["-c", _PLAIN.format(spec=2)], env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("ERROR DeviceError"), out
    assert "devices=2" in out and "a count of 2" in out
    assert "devlayer.spawn" in out and "devlayer launch" in out and "torchrun" in out
    assert "device(s) 1" not in out  # it did not ask for device 1


@pytest.mark.timeout(120)
def test_devices_count_from_env_in_plain_python_is_refused_too():
    proc = run_py(["-c", _PLAIN.format(spec=None)], env=subprocess_env(DEVLAYER_DEVICES="3"))
    assert proc.stdout.startswith("ERROR DeviceError"), proc.stdout + proc.stderr
    assert "DEVLAYER_DEVICES=3" in proc.stdout and "a count of 3" in proc.stdout


@pytest.mark.simulated
def test_devices_count_above_one_single_process_refused_with_devices_present(clean_env):
    with simulate("cuda", 4), pytest.raises(DeviceError, match=r"devlayer\.spawn"):
        devlayer.init(backend="cuda", devices=2)


@pytest.mark.simulated
def test_devices_one_or_an_index_list_in_plain_python_still_work(clean_env):
    with simulate("cuda", 4), devlayer.init(backend="cuda", devices=1) as st:
        assert st.device_index == 0 and st.visibility == ("CUDA_VISIBLE_DEVICES", "0")
    with simulate("cuda", 4), devlayer.init(backend="cuda", devices="2,") as st:
        assert st.device_index == 0 and st.visibility == ("CUDA_VISIBLE_DEVICES", "2")


def test_count_too_large_message_says_a_count_was_asked():
    with pytest.raises(DeviceError) as info:
        check_exists(4, 2, device_type="xpu", origin="DEVLAYER_DEVICES")
    msg = str(info.value)
    assert msg.startswith("DEVLAYER_DEVICES=4 asks for a count of 4 xpu devices"), msg
    assert "sees 2 xpu device(s)" in msg


# --------------------------------------------------------------------------- 13.5 count vs index


def _device_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if "DEVLAYER_DEVICES" in str(w.message)]


@pytest.mark.simulated
def test_bare_integer_in_devlayer_devices_warns_when_the_index_reading_differs(clean_env):
    clean_env.setenv("DEVLAYER_DEVICES", "1")
    clean_env.setattr(lifecycle, "_count_warned", False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with simulate("cuda", 4), devlayer.init(backend="cuda") as st:
            assert st.visibility == ("CUDA_VISIBLE_DEVICES", "0")  # a count: device 0
        with simulate("cuda", 4), devlayer.init(backend="cuda"):
            pass
    found = _device_warnings(record)
    assert len(found) == 1, found  # once per process
    assert "DEVLAYER_DEVICES=1" in found[0]
    assert "count" in found[0] and "device 0" in found[0] and "index 1" in found[0]
    assert "DEVLAYER_DEVICES=1," in found[0]


@pytest.mark.simulated
@pytest.mark.parametrize(("value", "count"), [("1,", 4), ("[1]", 4), ("1", 1), ("0,1", 4)])
def test_explicit_forms_or_no_second_reading_do_not_warn(clean_env, value, count):
    clean_env.setenv("DEVLAYER_DEVICES", value)
    clean_env.setattr(lifecycle, "_count_warned", False)
    with simulate("cuda", count), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with devlayer.init(backend="cuda"):
            pass
    assert _device_warnings(record) == []


@pytest.mark.simulated
def test_count_passed_as_an_argument_does_not_warn(clean_env):
    clean_env.setattr(lifecycle, "_count_warned", False)
    with simulate("cuda", 4), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with devlayer.init(backend="cuda", devices=1):
            pass
    assert _device_warnings(record) == []


# --------------------------------------------------------------------------- 13.6 sharing


def _three_ranks_on_one_node(monkeypatch: pytest.MonkeyPatch, rank: int) -> None:
    _set(
        monkeypatch,
        RANK=rank,
        WORLD_SIZE=3,
        LOCAL_RANK=rank,
        LOCAL_WORLD_SIZE=3,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=free_port(),
        DEVLAYER_LAUNCHER="env",
    )


@pytest.mark.simulated
@pytest.mark.parametrize("rank", [0, 2])
def test_three_ranks_on_two_devices_with_nccl_is_an_error(two_ranks, rank):
    _three_ranks_on_one_node(two_ranks, rank)
    two_ranks.setenv("DEVLAYER_SIMULATE", "cuda:2")
    with pytest.raises(DeviceError) as info:
        devlayer.init(backend="cuda")
    msg = str(info.value)
    assert "3 ranks" in msg and "2 cuda device(s)" in msg and "'nccl'" in msg
    assert "DEVLAYER_ALLOW_SHARED_DEVICES=1" in msg


@pytest.mark.simulated
def test_the_backend_says_which_comm_cannot_share_devices():
    cuda, cpu = (devlayer.backends.get_backend(n) for n in ("cuda", "cpu"))
    assert cuda.backend.exclusive_comms == ("nccl",)
    assert cuda.shares_devices_between_ranks("nccl") is False
    assert cuda.shares_devices_between_ranks("gloo") is True
    assert cpu.shares_devices_between_ranks("gloo") is True


@pytest.mark.simulated
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("extra", "rank", "warned"),
    [
        ({"DEVLAYER_ALLOW_SHARED_DEVICES": "1"}, 0, True),
        ({"DEVLAYER_COMM": "gloo"}, 0, True),
        ({"DEVLAYER_COMM": "gloo"}, 1, False),  # rank 0 says it, once
    ],
)
def test_shared_devices_warn_once_on_rank_0_when_allowed(clean_env, caplog, extra, rank, warned):
    _three_ranks_on_one_node(clean_env, rank)
    _set(clean_env, DEVLAYER_SIMULATE="cuda:2", **extra)
    clean_env.setattr(lifecycle, "_shared_warned", False)
    caplog.set_level(logging.WARNING, logger="devlayer")
    # Nobody else joins: the rendezvous gives up after 1 s, after the device was chosen.
    with pytest.raises(devlayer.errors.RendezvousError):
        devlayer.init(backend="cuda", timeout=1)
    notes = [r.getMessage() for r in caplog.records if "share" in r.getMessage()]
    if warned:
        assert len(notes) == 1, notes
        assert "3 ranks" in notes[0] and "2 cuda device(s)" in notes[0]
        assert "cuda:0, cuda:1, cuda:0" in notes[0]
    else:
        assert notes == []


# --------------------------------------------------------------------------- 13 test item


@pytest.mark.simulated
@pytest.mark.timeout(60)
def test_device_follows_local_rank_not_global_rank_on_a_second_node(clean_env):
    # Node 1 of 2, two ranks per node: global rank 2 is local rank 0 -> device 0, not 2.
    _set(
        clean_env,
        RANK=2,
        WORLD_SIZE=4,
        LOCAL_RANK=0,
        LOCAL_WORLD_SIZE=2,
        GROUP_RANK=1,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=free_port(),
        DEVLAYER_LAUNCHER="env",
    )
    with simulate("cuda", 4) as fake, pytest.raises(devlayer.errors.RendezvousError):
        devlayer.init(backend="cuda", timeout=1)  # nobody hosts the store: fails after 1 s
    assert fake.current == 0
    assert ("set_device", 0) in fake.calls


# --------------------------------------------------------------------------- 13.8 num_nodes


def test_num_nodes_is_public_and_on_state(clean_env):
    with devlayer.init(backend="cpu") as st:
        assert devlayer.num_nodes() == 1 == st.num_nodes
    assert "num_nodes" in devlayer.__all__


def test_num_nodes_needs_init(clean_env):
    with pytest.raises(devlayer.errors.NotInitializedError):
        devlayer.num_nodes()


def test_r27_r7_a_failed_process_group_leaves_its_round(clean_env: pytest.MonkeyPatch) -> None:
    """R27-R7: when ``init_process_group`` fails after the rendezvous, ``init()`` marks the
    round as left in its store (``rendezvous.LEFT_KEY``) before it raises, as ``shutdown()``
    does, so this rank's next ``init()`` on the same port does not join that round's store
    and claim its rank there a second time."""
    import torch.distributed as dist

    from devlayer.errors import RendezvousError
    from devlayer.rendezvous import LEFT_KEY

    added: list[tuple[str, int]] = []

    class Store:
        def add(self, key: str, amount: int) -> int:
            added.append((key, amount))
            return 1

    def fails(**_: Any) -> None:
        raise RuntimeError("gloo: connect timed out")

    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
    for key, value in {**env, "MASTER_PORT": str(free_port()), "DEVLAYER_LAUNCHER": "env"}.items():
        clean_env.setenv(key, value)
    clean_env.setenv("DEVLAYER_HANG_REPORTS", "0")
    clean_env.setattr(lifecycle, "rendezvous", lambda info, timeout: Store())
    clean_env.setattr(dist, "init_process_group", fails)
    with pytest.raises(RendezvousError, match="process group failed on rank 1 of 2"):
        devlayer.init(backend="cpu", timeout=5)
    assert added == [(LEFT_KEY, 1)]
    assert not devlayer.is_initialized()
