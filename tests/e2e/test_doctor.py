"""`devlayer doctor` passes on a healthy job and names the culprit on a broken one."""

from __future__ import annotations

import json

import pytest

from devlayer.testing import free_port
from tests.helpers import run_py, subprocess_env

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def _json_lines(stdout: str) -> list[dict]:
    """Every line that starts a JSON object, parsed; each must hold exactly one report.

    Strict on purpose: two ranks' reports run together on one line (``{...}{...}``) fail
    here with the line shown, instead of being pieced apart.
    """
    reports = []
    for line in stdout.splitlines():
        if line.startswith("{"):
            try:
                reports.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise AssertionError(
                    f"not one JSON report per line ({exc}): {line[:300]}"
                ) from None
    return reports


def test_doctor_single_process_passes():
    proc = run_py(["-m", "devlayer", "doctor"])
    assert proc.returncode == 0, proc.stderr
    assert "verdict: PASS" in proc.stdout


def test_doctor_under_launch_two_ranks_reports_every_rank():
    proc = run_py(
        ["-m", "devlayer", "launch", "--nproc", "2", "-m", "devlayer", "doctor", "--json"],
        timeout=150,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (report,) = _json_lines(proc.stdout)  # rank 0 prints the report
    assert report["ok"] is True
    ranks = report["smoke_test"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(not r.get("failed_step") for r in ranks)
    assert {"rendezvous", "barrier", "all_reduce"} <= set(ranks[0]["timings_ms"])


def test_doctor_names_the_rank_that_never_arrives():
    env = subprocess_env(RANK="0", WORLD_SIZE="2", MASTER_PORT=str(free_port()))
    proc = run_py(["-m", "devlayer", "doctor", "--timeout", "3"], env=env, timeout=60)
    assert proc.returncode == 1
    assert "FAIL on rank 0 at step 'rendezvous'" in proc.stdout
    assert "missing rank(s): 1" in proc.stdout
    assert "suspect: MASTER_ADDR, MASTER_PORT, WORLD_SIZE" in proc.stdout


def test_doctor_reports_a_broken_launcher_env():
    env = subprocess_env(RANK="3", WORLD_SIZE="2", MASTER_PORT="29999")
    proc = run_py(["-m", "devlayer", "doctor", "--json"], env=env)
    assert proc.returncode == 1
    (report,) = _json_lines(proc.stdout)
    assert report["smoke_test"]["failed_step"] == "launcher"
    assert "RANK=3" in report["smoke_test"]["error"]


@pytest.mark.simulated
def test_doctor_on_simulated_xpu_with_comm_gloo_reports_instead_of_crashing():
    # comm="gloo" on an accelerator builds an "xpu:gloo,cpu:gloo" group, on which torch's
    # monitored_barrier refuses to run: the barrier used to die there with a traceback.
    # With a simulated XPU the barrier now passes and the all_reduce (a real xpu tensor,
    # which this CPU build cannot make) fails: doctor must report it as a failed step.
    env = subprocess_env(DEVLAYER_SIMULATE="xpu:2", DEVLAYER_COMM="gloo")
    proc = run_py(
        ["-m", "devlayer", "launch", "--nproc", "2", "-m", "devlayer", "doctor", "--json"],
        env=env,
        timeout=150,
    )
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    reports = _json_lines(proc.stdout)
    # Both ranks fail, so each prints its own report, each on its own line.
    ranks = sorted(report["smoke_test"]["this_rank"]["rank"] for report in reports)
    assert ranks == [0, 1], proc.stdout[-2000:] + proc.stderr[-2000:]
    for report in reports:
        mine = report["smoke_test"]["this_rank"]
        assert mine["backend"] == "xpu" and mine["comm"] == "gloo"
        assert mine["failed_step"] == "all_reduce", mine
        assert "barrier" in mine["timings_ms"]
