"""Re-initialising on the same port: ``init()`` -> ``shutdown()`` -> ``init()`` in the
same processes, on the same MASTER_PORT, while rank 0 (the store's host) leaves last.

Each rank runs tests/dist/reinit_worker.py as hand-set ranks (tests/dist/ranks.py): rank 0
sleeps before each ``shutdown()``, so every other rank reaches the next ``init()`` while
rank 0's store of the previous round is still up: the race is made, not waited for.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

import devlayer
from devlayer.launchers import detect
from devlayer.rendezvous import LEFT_KEY
from tests.dist.ranks import finish, start_ranks
from tests.helpers import PY, ROOT, rank_results, subprocess_env, torchrun

pytestmark = [pytest.mark.dist]

WORKER = str(ROOT / "tests" / "dist" / "reinit_worker.py")


def _run(tmp_path: Path, world: int, rounds: int, **env: str) -> list[tuple[int, str, str]]:
    argv = [WORKER, str(rounds), "0.5", str(tmp_path / "hangs")]
    return finish(start_ranks(argv, world=world, env=env), timeout=150)


def _assert_every_round_summed(done: list[tuple[int, str, str]], world: int, rounds: int) -> None:
    failed = [f"rank {r} exited with {c}:\n{e[-2000:]}" for r, (c, _o, e) in enumerate(done) if c]
    assert not failed, "\n".join(failed)
    results = rank_results("".join(out for _c, out, _e in done))
    assert [r["rank"] for r in results] == list(range(world))
    assert all(r["sums"] == [float(world)] * rounds for r in results), results


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "env",
    [{}, {"DEVLAYER_PEER_WATCH": "0"}, {"DEVLAYER_HANG_REPORTS": "0"}],
    ids=["peer_watch_on", "peer_watch_off", "hang_reports_off"],
)
def test_r27_r1_two_ranks_reinit_on_the_same_port_while_the_host_leaves_last(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """Two ranks run ``with init(): all_reduce`` three times on one MASTER_PORT; rank 1
    re-initialises while rank 0's store of the round before is still up (rank 0 sleeps
    before its ``shutdown()``). Every round sums right on both ranks, with the survivor
    watch on, off, and with hang reports off: a rank never joins a round that has ended."""
    _assert_every_round_summed(_run(tmp_path, 2, 3, **env), world=2, rounds=3)


@pytest.mark.timeout(300)
def test_r27_r2_three_ranks_reinit_on_the_same_port_while_the_host_leaves_last(
    tmp_path: Path,
) -> None:
    """The same with three ranks (two clients meet the old store, peer watch off, so only
    rendezvous' own mark tells them the round ended): every round sums to 3 on every rank."""
    _assert_every_round_summed(_run(tmp_path, 3, 3, DEVLAYER_PEER_WATCH="0"), world=3, rounds=3)


@pytest.mark.timeout(60)
def test_r27_r3_a_rank_that_meets_only_an_ended_rounds_store_says_so(clean_env) -> None:
    """A rank whose ``init()`` meets only a store whose round has ended (this job's, marked
    left, and no new store comes up) fails within its timeout, saying it met only the
    previous round's store, and claims no rank there."""
    from datetime import timedelta

    import torch.distributed as dist

    old = dist.TCPStore(
        "127.0.0.1", 0, 2, True, timeout=timedelta(seconds=20), wait_for_workers=False
    )
    for key, value in {"RANK": 1, "WORLD_SIZE": 2, "MASTER_ADDR": "127.0.0.1"}.items():
        clean_env.setenv(key, str(value))
    clean_env.setenv("MASTER_PORT", str(old.port))
    clean_env.setenv("DEVLAYER_LAUNCHER", "env")
    old.set("devlayer/job", detect(os.environ).job_identity)
    round_ = dist.PrefixStore("devlayer/attempt/", old)  # as rendezvous() sees it
    round_.add(LEFT_KEY, 1)  # rank 0 of that round left
    with pytest.raises(devlayer.errors.RendezvousError) as info:
        devlayer.init(backend="cpu", timeout=2)
    assert f"met only the previous round's rendezvous store at 127.0.0.1:{old.port}" in str(
        info.value
    )
    assert not round_.check(["rank1"])  # nothing was claimed there
    assert round_.add("joined", 0) == 0


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_r27_r4_reinit_under_torchrun_with_its_agent_store(tmp_path: Path) -> None:
    """Under torchrun, whose agent hosts one store for every round of the workers
    (``TORCHELASTIC_USE_AGENT_STORE=True``), ``init()`` -> ``shutdown()`` -> ``init()`` in
    the same two workers works every round, rank 0 leaving last: each round meets under
    keys of its own (before: rank 1 met its own claim of the round before, "two processes
    claim rank 1")."""
    proc = subprocess.run(
        torchrun(WORKER, "3", "0.5", str(tmp_path / "hangs")),
        capture_output=True,
        text=True,
        timeout=200,
        env=subprocess_env(),
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = rank_results(proc.stdout)
    assert [r["sums"] for r in found] == [[2.0] * 3] * 2, found


@pytest.mark.timeout(90)
def test_r27_r5_leaving_a_store_whose_host_stopped_answering_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``shutdown()``'s mark (``devlayer.rendezvous.leave``) on a store whose host stopped
    answering (SIGSTOP: its kernel still holds the connection, nothing replies) returns
    after a few seconds with the error ignored, rather than waiting out the store's own
    timeout (here 300 s), so ``shutdown()`` never hangs on a lost rank 0."""
    import signal
    from datetime import timedelta

    import torch.distributed as dist

    from devlayer import rendezvous
    from devlayer.rendezvous import leave
    from devlayer.testing import free_port

    monkeypatch.setattr(rendezvous, "_left_a_round", False)  # leave() sets it: undone after

    port = free_port()
    host = subprocess.Popen(
        [
            PY,
            "-c",
            "import sys, time, datetime, torch.distributed as d; "
            f"s = d.TCPStore('127.0.0.1', {port}, 2, True, wait_for_workers=False); "
            "print('up', flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert host.stdout is not None and host.stdout.readline().strip() == "up"
        client = dist.TCPStore(
            "127.0.0.1", port, 2, False, timeout=timedelta(seconds=300), wait_for_workers=False
        )
        round_ = dist.PrefixStore("devlayer/attempt/", client)
        round_.add("joined", 1)  # the connection works
        os.kill(host.pid, signal.SIGSTOP)
        while Path(f"/proc/{host.pid}/stat").read_text().split(") ")[1][0] != "T":
            time.sleep(0.01)  # until it is stopped
        leave(round_)  # returns (bounded), the error ignored
    finally:
        os.kill(host.pid, signal.SIGCONT)
        host.kill()
        host.wait(timeout=30)


def _with_a_frozen_host(tmp_path: Path, mode: str, timeout: str) -> tuple[int, str, str]:
    """Start tests/dist/frozen_host_worker.py as 2 ranks, stop rank 0 (SIGSTOP) once both
    are ready, let rank 1 go on in ``mode``; rank 1's (returncode, stdout, stderr)."""
    import signal

    go = tmp_path / "go"
    worker = str(ROOT / "tests" / "dist" / "frozen_host_worker.py")
    procs = start_ranks([worker, str(go), str(tmp_path / "hangs"), mode, timeout], world=2)
    try:
        assert procs[0].stdout is not None and procs[1].stdout is not None
        assert procs[0].stdout.readline().strip() == "READY 0"
        assert procs[1].stdout.readline().strip() == "READY 1"
        os.kill(procs[0].pid, signal.SIGSTOP)
        go.touch()
        return finish([procs[1]], timeout=90)[0]
    finally:
        os.kill(procs[0].pid, signal.SIGCONT)
        procs[0].kill()
        finish([procs[0]], timeout=10)


@pytest.mark.timeout(150)
def test_r27_r6_shutdown_with_the_watch_on_never_waits_on_a_frozen_host(tmp_path: Path) -> None:
    """R27-R6: ``shutdown()`` on a rank that is not the host, with the survivor watch on (the
    default) and ``init(timeout=300)``, returns within seconds while rank 0, the store's
    host, is stopped (SIGSTOP: its connections stay open, nothing answers): the round's
    mark (R27-R5) and the watch's release (``PeerWatch.leave``, bounded by
    ``RELEASE_WAIT_S``) both give up instead of waiting out the store's timeout. Before,
    the release waited on the frozen host and rank 1 never got past ``shutdown()``."""
    code, out, err = _with_a_frozen_host(tmp_path, "shutdown", "300")
    assert code == 0, err[-3000:]
    assert rank_results(out) == [{"rank": 1, "sum": 2.0}], out


@pytest.mark.timeout(150)
def test_r27_r8_a_collective_timeout_with_a_frozen_host_still_ends(tmp_path: Path) -> None:
    """R27-R8: rank 1's all_reduce times out (``init(timeout=6)``) because rank 0, the
    store's host, is stopped (SIGSTOP): its ``CollectiveError`` still comes, with the hang
    report, and its ``shutdown()`` returns. The report's store traffic (posting this rank's
    position, gathering the others', the survivor watch's failure mark) is bounded: torch's
    TCPStore client does not honour its timeout while the host is stopped (a ``check`` with
    a 4 s timeout was seen waiting past 60 s), so before, rank 1 waited there for good."""
    code, out, err = _with_a_frozen_host(tmp_path, "collective", "6")
    assert code == 0, err[-3000:]
    assert rank_results(out) == [
        {"rank": 1, "error": "CollectiveError", "report": True},
        {"rank": 1, "sum": 2.0},
    ], out + err[-3000:]
