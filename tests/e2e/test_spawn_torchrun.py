"""Issue 20: devlayer.spawn and DEVLAYER_DEVICES under a real torchrun (subprocesses)."""

from __future__ import annotations

import json
import re

import pytest

from tests.helpers import ROOT, rank_results, run_py, subprocess_env, torchrun

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

_WORKER = str(ROOT / "tests" / "e2e" / "worker_spawn.py")


def test_r5_s3_spawn_under_torchrun_with_one_rank_starts_a_job_of_its_own():
    """`torchrun --standalone --nproc-per-node=1 script.py` whose script calls spawn(fn, 2):
    the two ranks meet on their own store, without torchrun's variables (was: they waited
    for torchrun's agent store, 600 s at the default timeout, then blamed the agent)."""
    proc = run_py(torchrun(_WORKER, "spawn", nproc=1)[1:], env=subprocess_env(), timeout=200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = re.search(r"RESULT (\{.*\})", proc.stdout)
    assert found, proc.stdout + proc.stderr
    ranks = json.loads(found.group(1))["ranks"]
    assert [(r["rank"], r["world_size"], r["sum"]) for r in ranks] == [(0, 2, 3), (1, 2, 3)]
    assert all(r["agent_store"] is None for r in ranks), ranks


def test_r5_s4_devlayer_devices_count_under_torchrun_on_cpu():
    """`DEVLAYER_DEVICES=2 torchrun --nproc-per-node=2` on cpu runs both ranks (was: 'a count
    of 2 cpu devices, but this process sees 1')."""
    env = subprocess_env(DEVLAYER_DEVICES="2")
    proc = run_py(torchrun(_WORKER, "count", nproc=2)[1:], env=env, timeout=200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [(r["rank"], r["sum"]) for r in rank_results(proc.stdout)] == [(0, 3), (1, 3)]
