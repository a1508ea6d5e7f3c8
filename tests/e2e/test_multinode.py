"""Two torchrun agents on this machine stand in for two hosts (issue 6, "Multi-node").

Each agent is started on its own (``--nnodes=2 --nproc-per-node=1``) and they meet through
the c10d rendezvous on a free loopback port, as two hosts would through ``head:29400``.
With ``c10d`` torchrun assigns node ranks in the order the agents join (``--node-rank`` is
ignored), so the tests check that ranks 0 and 1 both ran, not which agent got which.
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from typing import Any

import pytest

from devlayer.testing import free_port
from tests.helpers import PY, ROOT, subprocess_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

COLLECTIVES = str(ROOT / "tests" / "dist" / "worker_collectives.py")

# The short training run: tests/dist/trainer_worker.py's train() for one epoch, then the
# rank, the epoch loss and a digest of the final weights (identical on both "hosts").
TRAIN = """
import hashlib, json
import devlayer
from tests.dist.trainer_worker import train

with devlayer.init(backend="cpu", timeout=30):
    out = train(max_epochs=1, val=False)
    last = out["history"][-1]
    digest = hashlib.sha256(b"".join(w.numpy().tobytes() for w in out["weights"].values()))
    print("TRAIN " + json.dumps({
        "rank": out["rank"], "world_size": last["world_size"],
        "launcher": devlayer.state().process.launcher, "node_rank": devlayer.node_rank(),
        "loss": last["train_loss"], "weights": digest.hexdigest(),
    }), flush=True)
"""


def _two_agents(*program: str, timeout: float = 100) -> list[tuple[int, str, str]]:
    """Start two torchrun agents (node 0 and node 1) running ``program``; wait for both."""
    endpoint = f"127.0.0.1:{free_port()}"
    run_id = uuid.uuid4().hex[:12]
    procs = [
        subprocess.Popen(
            [
                PY,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc-per-node=1",
                f"--node-rank={node}",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint={endpoint}",
                f"--rdzv-id={run_id}",
                "--monitor-interval=0.2",
                *program,
            ],
            env=subprocess_env(),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in range(2)
    ]
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            done.append((p.returncode, out, err))
    finally:
        # When one agent fails the other can wait for its peer until the rendezvous
        # timeout: stop it rather than leave it behind.
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return done


def _records(tag: str, outputs: list[tuple[int, str, str]]) -> list[dict[str, Any]]:
    for rc, out, err in outputs:
        assert rc == 0, f"agent exited {rc}:\n{out[-2000:]}\n{err[-4000:]}"
    text = "".join(out for _, out, _ in outputs)
    found = [json.loads(m) for m in re.findall(rf"{tag} (\{{[^{{}}]*\}})", text)]
    return sorted(found, key=lambda r: r["rank"])


@pytest.mark.timeout(150)
def test_two_agents_run_every_collective():
    results = _records("RESULT", _two_agents(COLLECTIVES, "30"))
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["world_size"] == 2 and r["local_rank"] == 0 for r in results), results
    assert {r["launcher"] for r in results} == {"torchrun"}
    assert {r["comm"] for r in results} == {"gloo"}


@pytest.mark.timeout(150)
def test_two_agents_short_training_run():
    results = _records("TRAIN", _two_agents("--no-python", PY, "-c", TRAIN))
    assert [r["rank"] for r in results] == [0, 1]
    assert [r["node_rank"] for r in results] == [0, 1]  # one rank per "host"
    assert {r["launcher"] for r in results} == {"torchrun"}
    assert all(r["world_size"] == 2 for r in results)
    first, second = results
    assert first["loss"] == second["loss"]  # averaged over both ranks
    assert first["weights"] == second["weights"]  # DDP kept the replicas identical
