"""The survivor watch on real processes (issue 22, item 5): when a peer rank failed, a rank
stuck in its own code stops by itself instead of running on forever; a healthy job whose
rank 0 finishes first is never stopped; with hang reports off there is no watch.

Two plain processes with hand-set variables (``RANK``, ``WORLD_SIZE``, ``MASTER_*``): no
launcher stops the other rank here, as under MPICH's Hydra or ``srun`` without ``-K``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import devlayer
from devlayer.peerwatch import EXIT_CODE
from tests.dist.ranks import finish, start_ranks
from tests.helpers import ROOT, rank_results, subprocess_env, torchrun

pytestmark = [pytest.mark.dist]

JOB = str(ROOT / "tests" / "dist" / "hang_job.py")


def _two_ranks(mode: str, folder: Path, **env: str) -> list[tuple[int, str, str]]:
    """Run hang_job.py ``mode`` as ranks 0 and 1 (rank 0 hosts the store); each rank's
    (exit code, stdout, stderr). The timeout is a guard: the job must end by itself (a rank
    still running then is killed, and its exit code says so)."""
    return finish(start_ranks([JOB, mode, str(folder)], env=env), timeout=200)


def _dump(folder: Path, rank: int) -> dict:
    return json.loads((folder / f"rank{rank}.json").read_text())


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("mode", "code"), [("stuck", -15), ("stuck_ignoring_term", EXIT_CODE)])
def test_h22_s1_a_rank_stuck_in_user_code_stops_when_rank_0_failed(
    tmp_path: Path, mode: str, code: int
) -> None:
    """H22-S1: rank 0's all_reduce times out (CollectiveError, exit code 1) while rank 1
    loops in user code, and nothing outside stops rank 1: rank 1 notices the failure mark
    in the store, writes its dump (reason "peer rank 0 failed: ...", where:
    stuck_in_user_code), prints one line naming rank 0 and the dump, and ends by its
    SIGTERM (-15); when its own SIGTERM handler ignores the signal, by the hard exit
    (EXIT_CODE)."""
    (c0, _, err0), (c1, _, err1) = _two_ranks(mode, tmp_path, DEVLAYER_WATCHDOG="3")
    assert c0 == 1 and "all_reduce failed on rank 0 of 2" in err0, err0[-3000:]
    assert c1 == code, (c1, err1[-3000:])
    line = "devlayer: rank 1: peer rank 0 failed: all_reduce failed on rank 0 of 2; "
    assert f"{line}hang report written to {tmp_path / 'rank1.json'}" in err1, err1[-3000:]
    dump = _dump(tmp_path, 1)
    assert dump["reason"].startswith("peer rank 0 failed: all_reduce failed"), dump["reason"]
    assert dump["where"]["function"] == "stuck_in_user_code", dump["where"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["raise", "with_raise"])
def test_h22_s2_an_exception_leaving_rank_0_stops_the_stuck_rank(tmp_path: Path, mode: str) -> None:
    """H22-S2: rank 0 raises ValueError in its own code after init(), uncaught (through
    sys.excepthook) or out of a `with devlayer.init()` block (which shuts devlayer down
    before the exception ends the process): rank 1, stuck in user code, stops with
    "peer rank 0 failed: it raised ValueError: bad batch on rank 0"."""
    (c0, _, err0), (c1, _, err1) = _two_ranks(mode, tmp_path, DEVLAYER_WATCHDOG="0")
    assert c0 == 1 and "ValueError: bad batch on rank 0" in err0, err0[-3000:]
    assert c1 == -15, (c1, err1[-3000:])
    assert (
        "devlayer: rank 1: peer rank 0 failed: it raised ValueError: bad batch on rank 0; "
        "hang report written to " in err1
    ), err1[-3000:]
    assert _dump(tmp_path, 1)["where"]["function"] == "stuck_in_user_code"


@pytest.mark.timeout(300)
def test_h22_s10_a_stuck_rank_stops_when_the_store_host_was_killed(tmp_path: Path) -> None:
    """H22-S10: rank 0, which hosts the store, dies of SIGKILL (no handler, no failure
    mark, no "left") while rank 1 loops in user code: two failed polls in a row tell rank
    1 that the store is gone; it writes its dump (where: stuck_in_user_code), says so in
    one line naming rank 0 and ends by its SIGTERM."""
    (c0, _, _), (c1, _, err1) = _two_ranks("kill0", tmp_path, DEVLAYER_WATCHDOG="0")
    assert c0 == -9 and c1 == -15, (c0, c1, err1[-3000:])
    line = (
        "devlayer: rank 1: the job's store is gone: rank 0, its host, exited or was killed "
        "without leaving normally ("
    )
    assert line in err1, err1[-3000:]
    dump = _dump(tmp_path, 1)
    assert dump["reason"].startswith("the job's store is gone: rank 0"), dump["reason"]
    assert dump["where"]["function"] == "stuck_in_user_code", dump["where"]


@pytest.mark.timeout(300)
def test_h22_s11_a_stuck_rank_stops_when_the_store_host_froze(tmp_path: Path) -> None:
    """H22-S11: rank 0, which hosts the store, stops (SIGSTOP: its connections stay open,
    nothing answers) while rank 1 loops in user code: each poll is bounded by the watch
    itself (torch's store client ignores its timeout while the host is stopped), two
    polls without an answer tell rank 1 the store is gone, and it stops as in H22-S10.
    Before, its first poll waited for good and rank 1 ran on."""
    import signal

    procs = start_ranks([JOB, "stop0", str(tmp_path)], env={"DEVLAYER_WATCHDOG": "0"})
    try:
        assert procs[0].stdout is not None
        assert procs[0].stdout.readline().strip() == "STOPPING 0"
        c1, _out1, err1 = finish([procs[1]], timeout=120)[0]
    finally:
        procs[0].send_signal(signal.SIGCONT)
        procs[0].kill()
        finish([procs[0]], timeout=10)
    assert c1 == -15, (c1, err1[-3000:])
    assert "devlayer: rank 1: the job's store is gone: rank 0, its host," in err1, err1[-3000:]
    dump = _dump(tmp_path, 1)
    assert dump["where"]["function"] == "stuck_in_user_code", dump["where"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["early", "early_exit"])
def test_h22_s3_a_healthy_job_whose_rank_0_leaves_first_is_never_stopped(
    tmp_path: Path, mode: str
) -> None:
    """H22-S3: rank 0 finishes (with shutdown(), or exiting without it) while rank 1 works
    on without a collective for longer than the watch needs to act on a gone store: rank 0
    said that it left before its store went, so rank 1 is not stopped; both end with code
    0 and rank 1 finishes its work."""
    results = _two_ranks(mode, tmp_path, DEVLAYER_WATCHDOG="0")
    for rank, (code, _out, err) in enumerate(results):
        assert code == 0, (rank, code, err[-3000:])
        assert "peer rank" not in err and "store is gone" not in err, err[-3000:]
    found = rank_results(results[0][1] + results[1][1])
    assert [(r["rank"], r["finished"]) for r in found] == [(0, True), (1, True)], found


@pytest.mark.timeout(300)
def test_h22_s4_no_watch_with_hang_reports_off_or_the_watch_off(clean_env, tmp_path) -> None:
    """H22-S4: on 2 spawned ranks the survivor watch thread (devlayer-peerwatch) runs by
    default and ends at shutdown(); with DEVLAYER_HANG_REPORTS=0 no devlayer thread runs at
    all, and with DEVLAYER_PEER_WATCH=0 the watchdog runs without the watch."""
    from tests.dist.hang_worker import devlayer_threads

    runs = {}
    for name, env in {
        "default": {},
        "reports off": {"DEVLAYER_HANG_REPORTS": "0"},
        "watch off": {"DEVLAYER_PEER_WATCH": "0"},
    }.items():
        runs[name] = devlayer.spawn(
            devlayer_threads,
            nprocs=2,
            backend="cpu",
            timeout=60,
            join_timeout=180,
            env={"DEVLAYER_HANG_DIR": str(tmp_path), **env},
        )
    assert runs["default"] == [["devlayer-peerwatch", "devlayer-watchdog"]] * 2, runs
    assert runs["reports off"] == [[], []], runs
    assert runs["watch off"] == [["devlayer-watchdog"]] * 2, runs


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_h22_s5_no_watch_under_torchrun(tmp_path: Path) -> None:
    """H22-S5: under torchrun (whose agent stops and restarts its workers itself) no rank
    runs the survivor watch; the watchdog still runs, and no devlayer thread is left after
    shutdown()."""
    proc = subprocess.run(
        [*torchrun(JOB, "threads", str(tmp_path))],
        capture_output=True,
        text=True,
        timeout=200,
        env=subprocess_env(),
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = rank_results(proc.stdout)
    assert [r["threads"] for r in found] == [["devlayer-watchdog"]] * 2, found
    assert [r["after_shutdown"] for r in found] == [[], []], found
