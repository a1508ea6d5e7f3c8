"""`devlayer launch` in a Kubeflow Trainer v2 pod: it reads the PET_* variables (issue 25)."""

from __future__ import annotations

import pytest

from tests.helpers import ROOT, rank_results, run_py, subprocess_env

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

WORKER = str(ROOT / "tests" / "e2e" / "worker_launch.py")


def test_l25_5_devlayer_launch_starts_the_ranks_kubeflow_trainer_asks_for():
    """L25-5: with only Trainer v2's PET_* variables (one node of 2 processes) and no
    options, `devlayer launch` starts 2 ranks that meet (it read PET_NPROC_PER_NODE); the
    script started without it would have been refused with "use torchrun"."""
    env = subprocess_env()
    env.update(PET_NNODES="1", PET_NPROC_PER_NODE="2", PET_NODE_RANK="0")
    proc = run_py(["-m", "devlayer", "launch", WORKER], env=env, timeout=150)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert [r["RANK"] for r in rank_results(proc.stdout, "RANK")] == [0, 1]
    alone = run_py([WORKER], env=env, timeout=150)
    assert alone.returncode != 0 and "torchrun" in alone.stderr, alone.stderr[-2000:]
