"""torchrun's elastic mode for real on loopback (issue 23): two agents, one is killed, the
survivor continues at the smaller world from the last checkpoint, on the same samples."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devlayer.testing import free_port
from tests.dist.elastic_worker import GLOBAL_BATCH, N_SAMPLES
from tests.helpers import PY, ROOT, subprocess_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

WORKER = ROOT / "tests" / "e2e" / "worker_elastic.py"
STEPS_PER_EPOCH = -(-N_SAMPLES // GLOBAL_BATCH)


def _agent(folder: Path, port: int, name: str) -> subprocess.Popen[str]:
    cmd = [
        PY,
        "-m",
        "torch.distributed.run",
        "--nnodes=1:2",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        f"--rdzv-id=e23-{port}",
        "--rdzv-conf=last_call_timeout=5,join_timeout=120",
        "--max-restarts=3",
        "--monitor-interval=0.5",
        str(WORKER),
        str(folder),
    ]
    out = (folder / f"{name}.log").open("w")
    return subprocess.Popen(
        cmd,
        env=subprocess_env(),
        cwd=ROOT,
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _descendants(pid: int) -> list[int]:
    """``pid``'s child processes, recursively (torchrun starts workers in new sessions)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _records(folder: Path) -> Iterator[dict]:
    for path in sorted(folder.glob("records-*.jsonl")):
        for line in path.read_text().splitlines():
            if line.endswith("}"):
                yield json.loads(line)


def _trained_at_world_two(folder: Path, step: int) -> bool:
    return any(r["world"] == 2 and r["step"] >= step for r in _records(folder))


def _steps_kept(folder: Path) -> dict[int, list[int]]:
    """Step -> sorted indices, each step from the last attempt that trained it (a later
    attempt starts at the checkpoint and trains the steps after it again)."""
    by_attempt: dict[int, dict[int, list[int]]] = {}
    for r in _records(folder):
        by_attempt.setdefault(r["attempt"], {}).setdefault(r["step"], []).extend(r["idx"])
    kept: dict[int, list[int]] = {}
    for attempt in sorted(by_attempt):
        start = min(by_attempt[attempt])
        kept = {s: v for s, v in kept.items() if s < start}
        kept.update(by_attempt[attempt])
    return {s: sorted(v) for s, v in sorted(kept.items())}


def _expected() -> dict[int, list[int]]:
    """What an uninterrupted run trains on, per step (the global order at world size 1)."""
    from devlayer.train.data import GlobalOrder

    steps = {}
    for epoch in range(2):
        order = GlobalOrder(N_SAMPLES, 1, 0, True, 7, GLOBAL_BATCH)
        order.set_epoch(epoch)
        positions = list(order)
        for s in range(STEPS_PER_EPOCH):
            chunk = positions[s * GLOBAL_BATCH : (s + 1) * GLOBAL_BATCH]
            steps[epoch * STEPS_PER_EPOCH + s] = sorted(chunk)
    return steps


def test_e23_9_a_killed_agent_leaves_the_survivor_training_exactly(tmp_path):
    """E23-9: two torchrun agents (``--nnodes=1:2``, c10d rendezvous, ``--max-restarts``)
    train at world size 2; SIGKILL to the second agent and its worker: the survivor
    re-rendezvouses, resumes the last checkpoint at world size 1 (global batch kept,
    ``grad_accum`` 2) and finishes; the metrics file records the change, and every step
    of the run trained on the samples of an uninterrupted run."""
    port = free_port()
    first = _agent(tmp_path, port, "first")
    time.sleep(1.0)  # the first agent hosts the rendezvous store
    second = _agent(tmp_path, port, "second")
    try:
        deadline = time.monotonic() + 300
        while not _trained_at_world_two(tmp_path, 4):
            assert time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.2)
        for pid in [second.pid, *_descendants(second.pid)]:
            os.kill(pid, signal.SIGKILL)
        second.wait(timeout=30)
        first.wait(timeout=400)
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    log = (tmp_path / "first.log").read_text()
    assert first.returncode == 0, log[-4000:]
    assert f"DONE rank=0 world=1 step={2 * STEPS_PER_EPOCH}" in log, log[-4000:]
    events = [
        json.loads(line)
        for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
        if '"event"' in line
    ]
    shrink = [e for e in events if (e["old_world_size"], e["new_world_size"]) == (2, 1)]
    assert shrink and shrink[0]["rederived"]["grad_accum"] == [1, 2], events
    assert _steps_kept(tmp_path) == _expected()
