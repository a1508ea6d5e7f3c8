"""Issue 20: what devlayer.spawn passes its ranks, proved on two real gloo ranks."""

from __future__ import annotations

import os

import pytest

import devlayer

pytestmark = [pytest.mark.dist, pytest.mark.timeout(240)]


def _init_again_and_sum() -> dict[str, object]:
    """The rank's own init() with spawn's request given again, then one collective."""
    st = devlayer.state()
    again = devlayer.init(comm="gloo")  # what a script written for torchrun calls
    return {
        "rank": devlayer.rank(),
        "same": again is st,
        "comm": st.comm,
        "sum": devlayer.all_reduce(devlayer.rank() + 1),
        "devices": os.environ.get("DEVLAYER_DEVICES"),
    }


def test_r5_s7_a_spawned_function_may_call_init_with_spawns_comm(clean_env):
    """spawn(..., comm="gloo") reaches every rank's init(), and the function's own
    init(comm="gloo") returns that State (was: no comm= argument, and init(comm="gloo")
    raised 'already called with ... comm=None')."""
    results = devlayer.spawn(
        _init_again_and_sum, nprocs=2, backend="cpu", comm="gloo", timeout=30, join_timeout=150
    )
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["same"] and r["comm"] == "gloo" and r["sum"] == 3 for r in results), results


def test_r5_s4_spawn_two_ranks_with_a_count_of_two_devices_on_cpu(clean_env):
    """spawn(fn, nprocs=2, devices=2) on cpu runs two ranks (a count of ranks there), where it
    raised 'a count of 2 cpu devices, but this process sees 1'."""
    results = devlayer.spawn(
        _init_again_and_sum, nprocs=2, backend="cpu", devices=2, timeout=30, join_timeout=150
    )
    assert [(r["rank"], r["sum"], r["devices"]) for r in results] == [(0, 3, "2"), (1, 3, "2")]
    assert all(r["same"] for r in results)  # comm=None is cpu's own gloo


@pytest.mark.simulated
def test_r5_s6_two_spawned_ranks_on_one_simulated_device_refuse_nccl(clean_env):
    """DEVLAYER_SIMULATE=cuda:1 and two spawned ranks: init() in the ranks raises DeviceError
    (nccl cannot share a device) before any rendezvous, instead of binding cuda:0 twice."""
    with pytest.raises(devlayer.RankFailedError) as err:
        devlayer.spawn(
            _init_again_and_sum,
            nprocs=2,
            backend="cuda",
            env={"DEVLAYER_SIMULATE": "cuda:1"},
            timeout=30,
            join_timeout=150,
        )
    text = str(err.value)
    assert "DeviceError" in text and "2 ranks run on this node but 1 cuda device(s)" in text
    assert "DEVLAYER_ALLOW_SHARED_DEVICES=1" in text
