"""`devlayer launch` as a user runs it."""

from __future__ import annotations

import pytest

from tests.helpers import ROOT, rank_results, run_py, subprocess_env

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

WORKER = str(ROOT / "tests" / "e2e" / "worker_launch.py")


def test_launch_two_ranks_passes_arguments_and_rendezvous_on_loopback():
    proc = run_py(["-m", "devlayer", "launch", "--nproc", "2", WORKER, "--lr", "0.1"], timeout=150)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = rank_results(proc.stdout, "RANK")
    assert [r["RANK"] for r in results] == [0, 1]
    assert all(r["args"] == ["--lr", "0.1"] for r in results)
    for r in results:
        assert r["listeners"] and set(r["listeners"]) == {"0100007F"}, r["listeners"]


def test_launch_returns_the_failing_ranks_exit_code_and_names_it():
    proc = run_py(["-m", "devlayer", "launch", "--nproc", "2", WORKER, "--fail-rank1"], timeout=150)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "devlayer launch: rank 1 (local rank 1" in proc.stderr
    assert "exited with code 3" in proc.stderr


def test_launch_sets_omp_threads_to_cores_per_rank():
    env = subprocess_env()
    env.pop("OMP_NUM_THREADS", None)
    proc = run_py(["-m", "devlayer", "launch", "--nproc", "2", WORKER], env=env, timeout=150)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import os

    expected = str(max(len(os.sched_getaffinity(0)) // 2, 1))
    assert {r["omp"] for r in rank_results(proc.stdout, "RANK")} == {expected}


@pytest.mark.simulated
def test_launch_simulated_cuda_devices_auto_nproc_and_visibility():
    env = subprocess_env(DEVLAYER_SIMULATE="cuda:4")
    proc = run_py(
        ["-m", "devlayer", "launch", "--devices", "1,3", WORKER, "--no-init"], env=env, timeout=150
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = rank_results(proc.stdout, "RANK")
    assert [r["RANK"] for r in results] == ["0", "1"]  # auto: one per selected device
    assert {r["CUDA_VISIBLE_DEVICES"] for r in results} == {"1,3"}
    assert {r["DEVLAYER_VISIBILITY_APPLIED"] for r in results} == {"CUDA_VISIBLE_DEVICES=1,3"}


def test_launch_rejects_bad_devices_before_starting_anything():
    proc = run_py(["-m", "devlayer", "launch", "--devices", "0,0", WORKER], timeout=60)
    assert proc.returncode == 2
    assert "--devices='0,0'" in proc.stderr and "more than once" in proc.stderr
