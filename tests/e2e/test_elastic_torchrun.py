"""torchrun's elastic mode for real on loopback (issue 23): two agents, one is killed, the
survivor continues at the smaller world from the last checkpoint, on the same samples; the
killed agent started again grows the job back."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devlayer.testing import free_port
from tests.dist.elastic_worker import GLOBAL_BATCH, N_SAMPLES
from tests.helpers import PY, ROOT, subprocess_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

WORKER = ROOT / "tests" / "e2e" / "worker_elastic.py"
STEPS_PER_EPOCH = -(-N_SAMPLES // GLOBAL_BATCH)


def _agent(
    folder: Path, port: int, name: str, *worker_args: str, **env: str
) -> subprocess.Popen[str]:
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
        *worker_args,
    ]
    out = (folder / f"{name}.log").open("w")
    return subprocess.Popen(
        cmd,
        env=subprocess_env(**env),
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


def _trained_at(folder: Path, world: int, step: int) -> bool:
    return any(r["world"] == world and r["step"] >= step for r in _records(folder))


def _trained_at_world_two(folder: Path, step: int) -> bool:
    return _trained_at(folder, 2, step)


def _kill_agent(proc: subprocess.Popen[str]) -> None:
    """SIGKILL to an agent and its workers (torchrun starts them in sessions of their own)."""
    for pid in [proc.pid, *_descendants(proc.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)


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
    of the run trained on the samples of an uninterrupted run. L27-4: torch's shared
    store is on (no ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE``), so rank 0's Trainer warns,
    from the variables real torchrun gave it, that the job could not grow back."""
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
    assert "WorldSizeChangeWarning" in log, log[-4000:]
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun" in log, log[-4000:]
    events = [
        json.loads(line)
        for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
        if '"event"' in line
    ]
    shrink = [e for e in events if (e["old_world_size"], e["new_world_size"]) == (2, 1)]
    assert shrink and shrink[0]["rederived"]["grad_accum"] == [1, 2], events
    assert _steps_kept(tmp_path) == _expected()


def _wait_until(done: Any, agents: list[tuple[subprocess.Popen[str], Path]], what: str) -> None:
    """Poll ``done()`` for up to 300 s while every agent in ``agents`` is alive."""
    deadline = time.monotonic() + 300
    while not done():
        for proc, log in agents:
            assert proc.poll() is None, (
                f"{log.name} exited before {what}: {log.read_text()[-3000:]}"
            )
        assert time.monotonic() < deadline, (
            f"no {what} in 300 s: {agents[0][1].read_text()[-3000:]}"
        )
        time.sleep(0.2)


def _world_changes(folder: Path) -> list[tuple[int, int, list[int]]]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in lines if '"event"' in line]
    return [
        (e["old_world_size"], e["new_world_size"], e["rederived"]["grad_accum"]) for e in events
    ]


#: The survivor, alone, trains up to this step and then waits there for the agent to
#: come back (it never finishes first).
HOLD_STEP = 10


def _grows_back(tmp_path: Path, start: Any) -> None:
    """Two agents from ``start(port, name)``, the second killed and started again; checks
    that the job shrinks to 1 rank, grows back to 2 and trains exactly."""
    port = free_port()
    first = start(port, "first")
    time.sleep(1.0)  # the first agent hosts the rendezvous store
    second = start(port, "second")
    again = None
    try:
        _wait_until(
            lambda: _trained_at(tmp_path, 2, 4), [(first, tmp_path / "first.log")], "world 2"
        )
        _kill_agent(second)
        alone = [(first, tmp_path / "first.log")]
        _wait_until(lambda: _trained_at(tmp_path, 1, HOLD_STEP), alone, "world 1")
        again = start(port, "again")
        first.wait(timeout=400)
        again.wait(timeout=120)
    finally:
        for proc in (first, second, again):
            if proc is not None and proc.poll() is None:
                _kill_agent(proc)
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in ("first", "again")}
    for name, proc in (("first", first), ("again", again)):
        assert proc is not None and proc.returncode == 0, logs[name][-4000:]
    done = f"world=2 step={2 * STEPS_PER_EPOCH}"
    assert f"DONE rank=0 {done}" in logs["first"], logs["first"][-4000:]
    assert f"DONE rank=1 {done}" in logs["again"], logs["again"][-4000:]
    # L27-4: the store is not shared, so the job can grow back: no warning says otherwise.
    assert not [name for name, log in logs.items() if "WorldSizeChangeWarning" in log]
    assert _world_changes(tmp_path) == [(2, 1, [1, 2]), (1, 2, [2, 1])]
    assert _steps_kept(tmp_path) == _expected()


def test_e23_10_a_killed_agent_started_again_grows_the_job_back(tmp_path):
    """E23-10: two torchrun agents at world size 2; SIGKILL to the second agent and its
    worker; the survivor resumes at world size 1 and trains on; the second agent started
    again (same ``--rdzv-id`` and endpoint) joins, the survivor's workers restart, and the
    job grows back to world size 2 from the newest checkpoint and finishes on both agents.
    Both changes are in the metrics file (``grad_accum`` 1 -> 2 -> 1) and every step trained
    on the samples of an uninterrupted run. The agents run with
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: with torch's shared store the surviving rank-0
    agent keeps the bootstrap address of its first round and never publishes
    ``MASTER_ADDR`` for the new round, so the rejoining agent times out (see
    docs/checkpoints.md). L27-4: no WorldSizeChangeWarning in the agents' logs."""
    env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    _grows_back(tmp_path, lambda port, name: _agent(tmp_path, port, name, str(HOLD_STEP), **env))


def _launch_agent(folder: Path, port: int, name: str) -> subprocess.Popen[str]:
    cmd = [
        PY,
        "-m",
        "devlayer",
        "launch",
        "--nnodes=1:2",
        "--nproc=1",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        f"--rdzv-id=e23-{port}",
        "--max-restarts=3",
        "--monitor-interval=0.5",
        str(WORKER),
        str(folder),
        str(HOLD_STEP),
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


def test_e23_13_devlayer_launch_agents_grow_back_with_no_extra_setting(tmp_path):
    """E23-13: the same as E23-10 with ``devlayer launch --nnodes=1:2 --rdzv-endpoint=...``
    agents and no torch variable set by the user: ``devlayer launch`` turns torch's shared
    rendezvous store off for a c10d rendezvous, so a killed agent started again grows the
    job back to world size 2, exactly. L27-4: no WorldSizeChangeWarning in the agents'
    logs."""
    _grows_back(tmp_path, lambda port, name: _launch_agent(tmp_path, port, name))
