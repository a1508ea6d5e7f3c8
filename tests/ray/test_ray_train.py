"""Ray Train for real: ``TorchTrainer`` with 2 CPU workers runs a devlayer ``Trainer``.

Run by ``tox -e ray`` (ray[train] 2.60.0). Every test here is marked ``ray`` and skips when
ray is not installed (``.ci/run`` does not install it: a Ray start costs about a minute
here); ``tox -e ray`` sets ``DEVLAYER_REQUIRE_RAY=1``, which turns that skip into a failure.
Nothing is simulated: ``tests/ray/ray_job.py`` starts a local Ray (2 CPUs) in a subprocess
with a hard timeout, Ray creates the process group and starts the workers, and one worker
is SIGKILLed for real.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import PY, ROOT, subprocess_env
from tests.launchers.test_real_launchers import slurm  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

JOB = str(ROOT / "tests" / "ray" / "ray_job.py")


def _need_ray() -> None:
    """Under ``DEVLAYER_REQUIRE_RAY=1`` (tox -e ray) conftest does not skip: fail clearly."""
    if importlib.util.find_spec("ray") is None:
        pytest.fail(
            "DEVLAYER_REQUIRE_RAY=1 but ray is not installed: tox -e ray installs it "
            "(extras dev, ray), or pip install -e '.[ray]'"
        )


def _run_job(out: Path, *cmd_prefix: str, runs: str = "ref,kill") -> subprocess.CompletedProcess:
    _need_ray()
    out.mkdir(parents=True, exist_ok=True)
    cmd = [*cmd_prefix, PY, JOB, str(out), "--runs", runs, "--kill-at-step", "5"]
    # Ray gives a worker group 60 s to start; a loaded 2-core machine can take longer. Train
    # V2 (2.60's default) always: V1 needs a third CPU for its trainer actor and would wait.
    env = subprocess_env(
        RAY_TRAIN_V2_ENABLED="1",
        RAY_DEDUP_LOGS="0",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="300",
    )
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=560)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for name in runs.split(","):
        assert f"RUN {name} error=None" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _records(run: Path, kind: str) -> list[dict[str, Any]]:
    """The ``<kind>-rank<R>-<pid>.json`` records of one run, by rank, then in pid order."""
    found = []
    for path in run.glob(f"{kind}-rank*.json"):
        rank = int(path.name.split("-")[1][4:])
        found.append({"rank": rank, **json.loads(path.read_text())})
    return sorted(found, key=lambda r: (r["rank"], r["pid"]))


@pytest.fixture(scope="module")
def ray_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One local Ray: an uninterrupted TorchTrainer run, then one whose rank 1 is killed."""
    out = tmp_path_factory.mktemp("ray")
    _run_job(out)
    return out


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_y25_5_devlayer_init_adopts_rays_process_group_with_rays_ranks(ray_runs):
    """Y25-5: in each of Ray's 2 workers the process group exists before devlayer.init(),
    which adopts it (the same group object, owns_process_group False, gloo) and reports
    launcher 'ray' with the rank, world size, local rank, local world size and node rank
    Ray's train context gives, sourced from Ray's variables."""
    starts = _records(ray_runs / "ref", "start")
    assert [r["rank"] for r in starts] == [0, 1], starts
    for r in starts:
        assert r["group_before_init"] and r["same_group"], r
        assert r["owns_process_group"] is False and r["comm"] == "gloo", r
        assert r["launcher"] == "ray", r
        assert r["devlayer"] == r["ray"] == [r["rank"], 2, r["rank"]], r
        assert r["torch"] == [r["rank"], 2], r
        assert (r["devlayer_local_world"], r["devlayer_node_rank"], r["num_nodes"]) == (2, 0, 1)
        assert (r["ray_local_world"], r["ray_node_rank"]) == (2, 0), r
        assert r["sources"]["rank"] == "RANK" and r["sources"]["master_port"] == "MASTER_PORT"


def test_y25_6_devlayer_shutdown_leaves_rays_process_group_working(ray_runs):
    """Y25-6: after the Trainer's fit and devlayer.shutdown(), each worker's process group
    still exists and an all_reduce over it gives 1 + 2 = 3: it is Ray's to destroy."""
    ends = _records(ray_runs / "ref", "end")
    assert [r["rank"] for r in ends] == [0, 1], ends
    assert all(r["group_after_shutdown"] and r["sum_after_shutdown"] == 3.0 for r in ends), ends
    assert all(r["resumed_from"] is None for r in ends), ends


def test_y25_7_a_killed_worker_ray_restarts_and_the_run_resumes_bitwise_equal(ray_runs):
    """Y25-7: rank 1 SIGKILLed after step 5 (checkpoints at steps 2 and 4); with
    FailureConfig(max_failures=1) Ray starts a new worker group (new processes for both
    ranks, devlayer.init() adopts the new group), both ranks resume from devlayer's step-4
    checkpoint, and the final weights are bitwise equal to the uninterrupted run's."""
    run = ray_runs / "kill"
    killed_pid = int((run / "killed").read_text())
    starts, ends = _records(run, "start"), _records(run, "end")
    assert [r["rank"] for r in starts] == [0, 0, 1, 1], starts  # two attempts
    assert killed_pid in [r["pid"] for r in starts if r["rank"] == 1]
    assert all(r["launcher"] == "ray" and not r["owns_process_group"] for r in starts)
    assert [r["rank"] for r in ends] == [0, 1] and killed_pid not in [r["pid"] for r in ends]
    assert all(Path(r["resumed_from"]).name == "step-000000004" for r in ends), ends
    ref = torch.load(ray_runs / "ref" / "weights.pt", weights_only=True)
    resumed = torch.load(run / "weights.pt", weights_only=True)
    assert _same(resumed, ref)


@pytest.mark.launcher
def test_y25_2_ray_started_inside_a_real_srun_step_trains_with_rays_ranks(slurm, tmp_path):  # noqa: F811
    """Y25-2 for real: Ray started inside ``srun -n 1`` (as Ray's SLURM guide starts its head
    node) leaves SLURM_PROCID=0 of 1 in both workers; devlayer still reads Ray's ranks 0 and
    1 of 2, adopts Ray's group and trains (it refused with 'conflicting launcher variables')."""
    _run_job(tmp_path, "srun", "-n", "1", "-c", "2", runs="ref")
    starts = _records(tmp_path / "ref", "start")
    assert [r["outer"] for r in starts] == [{"SLURM_PROCID": "0"}] * 2, starts
    assert [r["devlayer"] for r in starts] == [[0, 2, 0], [1, 2, 1]], starts
    assert all(r["launcher"] == "ray" and not r["owns_process_group"] for r in starts)
    assert all("SLURM" not in source for r in starts for source in r["sources"].values())
    assert os.path.exists(tmp_path / "ref" / "weights.pt")
