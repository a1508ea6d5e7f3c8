"""The verdict over hang reports and ``devlayer hangs DIR`` (issue 22, item C): pure tests."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from devlayer.cli import main
from devlayer.hangdump import _chain, default_dir, dump_handler_of, where
from devlayer.hangreport import DUMP_FORMAT, mismatches, read_dumps, verdict


def _rec(seq: int, op: str, state: str = "done", detail: str = "[4] float32") -> dict:
    return {"seq": seq, "op": op, "detail": detail, "site": f"t.py:{10 + seq}", "state": state}


def _report(rank: int, *records: dict, where: dict | None = None) -> dict:
    return {
        "format": DUMP_FORMAT,
        "rank": rank,
        "world_size": 4,
        "ledger": list(records),
        "where": where,
    }


def test_h22_9_verdict_names_each_rank_divergence_and_the_missing() -> None:
    """H22-9: with 4 ranks: rank 0 waits in all_reduce #3, rank 1 never entered it (named
    with its function and line), rank 2 called broadcast at #3 (a different collective),
    rank 3 left nothing: the verdict says all four, elsewhere-ranks first."""
    reports = {
        0: _report(0, _rec(2, "all_reduce"), _rec(3, "all_reduce", "running")),
        1: _report(1, _rec(2, "all_reduce"), where={"function": "load", "site": "data.py:7"}),
        2: _report(2, _rec(2, "all_reduce"), _rec(3, "broadcast", "failed")),
    }
    lines = verdict(reports, world_size=4).splitlines()
    assert lines[0] == (
        "rank 1 has not entered all_reduce #3; it is in load at data.py:7 (last collective: "
        "all_reduce #2 [4] float32 at t.py:12, done)"
    )
    assert "rank 0 waits in all_reduce #3 [4] float32 at t.py:13" in lines
    assert "rank 2 waited in broadcast #3 [4] float32 at t.py:13 until it failed" in lines
    assert (
        "ranks called different collectives at #3: rank 0 all_reduce #3 [4] float32 at "
        "t.py:13; rank 2 broadcast #3 [4] float32 at t.py:13"
    ) in lines
    assert lines[-1].startswith("rank(s) 3 left no report (no dump, no answer)")


def test_h22_9_shapes_differ_for_all_reduce_but_may_for_all_gather() -> None:
    """H22-9: the same op with different shapes is a mismatch for all_reduce, not for
    all_gather (dim 0 may differ by design)."""
    a = {0: _report(0, _rec(1, "all_reduce")), 1: _report(1, _rec(1, "all_reduce", detail="[5]"))}
    g = {0: _report(0, _rec(1, "all_gather")), 1: _report(1, _rec(1, "all_gather", detail="[5]"))}
    assert len(mismatches(a)) == 1 and mismatches(g) == []


def test_verdict_with_no_collective_in_flight() -> None:
    reports = {0: _report(0), 1: _report(1, _rec(0, "barrier"))}
    text = verdict(reports, world_size=2)
    assert "rank 0 ran no collective yet" in text and "rank 1: last collective barrier #0" in text


def test_h22_10_devlayer_hangs_reads_a_folder(tmp_path: Path, capsys) -> None:
    """H22-10: ``devlayer hangs DIR`` prints the verdict of the dumps in DIR, names a file
    that is not a dump and the ranks that left none; a folder without dumps is an error
    that says a job with no hang writes none."""
    (tmp_path / "rank0.json").write_text(json.dumps(_report(0, _rec(0, "all_reduce", "failed"))))
    (tmp_path / "rank2.json").write_text("not json")
    assert main(["hangs", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "rank 0 waited in all_reduce #0" in out.out
    assert "rank(s) 1, 2, 3 left no report" in out.out
    assert "rank2.json: not readable as JSON" in out.err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["hangs", str(empty)]) == 2
    assert "a job with no hang writes none" in capsys.readouterr().err
    assert main(["hangs", str(tmp_path / "nope")]) == 2


def test_read_dumps_skips_other_json(tmp_path: Path) -> None:
    (tmp_path / "rank0.json").write_text(json.dumps({"format": "other"}))
    reports, problems = read_dumps(tmp_path)
    assert reports == {} and "not a devlayer hang dump" in problems[0]


def test_default_dir_is_per_user_and_job() -> None:
    path = default_dir("torchrun", None, 29500, tmp="/t")
    assert path.parent.name.startswith("devlayer-hangs-") and path.name == "torchrun-port29500"


def test_h22_11_sigusr1_default_is_not_chained_but_a_callable_is() -> None:
    """H22-11: after its dump, devlayer hands a signal on: to a callable handler, and for
    SIGUSR1 never to the default action (which would end the process)."""
    seen: list[int] = []
    _chain(signal.SIGUSR1, None, signal.SIG_DFL)  # the test process goes on
    _chain(signal.SIGUSR1, None, lambda s, f: seen.append(s))
    _chain(signal.SIGTERM, None, signal.SIG_IGN)
    assert seen == [signal.SIGUSR1]
    assert dump_handler_of(signal.SIG_DFL) is None


def test_where_skips_library_frames() -> None:
    import sys

    here = where(sys._getframe())
    assert here is not None and here["function"] == "test_where_skips_library_frames"


def test_r27_3_where_skips_torchs_folder_not_a_user_folder_named_torch() -> None:
    """R27-3: one walk up the stack (``ledger.first_outside``) serves the ledger, the
    signature checks, DDP's hook and the dump's "where": torch's frames are passed over by
    torch's own folder, so a user's code in a folder named ``torch`` is still the user's
    (the dump used to skip any path with ``/torch/`` in it and named torch's caller, or no
    frame of the user's at all)."""
    import os
    from types import SimpleNamespace as F

    import torch

    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    user = F(f_code=F(co_filename="/home/me/torch/train.py", co_name="step"), f_back=None)
    user.f_lineno = 12
    inner = F(f_code=F(co_filename=f"{torch_dir}/nn/module.py", co_name="_call"), f_back=user)
    inner.f_lineno = 3
    assert where(inner) == {
        "function": "step",
        "site": "train.py:12",
        "file": "/home/me/torch/train.py",
    }
    # a stack with nothing of the user's: the frame itself, as before
    assert where(inner.__class__(f_code=inner.f_code, f_back=None, f_lineno=3))["function"] == (
        "_call"
    )


@pytest.mark.parametrize("bad", ["", 3])
def test_hang_dir_must_be_a_path(bad: object, clean_env) -> None:
    import devlayer

    with pytest.raises(devlayer.DevlayerError, match="hang_dir="):
        devlayer.init(backend="cpu", hang_dir=bad)  # type: ignore[arg-type]


def test_world_size_one_installs_no_handler(clean_env) -> None:
    """One process has no peer to wait for: init() leaves the signal handlers alone."""
    import devlayer

    before = signal.getsignal(signal.SIGUSR1)
    with devlayer.init(backend="cpu"):
        assert signal.getsignal(signal.SIGUSR1) is before


def test_h22_17_a_planted_link_or_foreign_folder_gets_no_dump(tmp_path: Path, capsys) -> None:
    """H22-17: a dump folder that is a symlink is refused (nothing is written through it,
    the reason goes to stderr); a plain folder of this user gets a 0600 dump; stop() puts
    the signal handlers back."""
    from devlayer import hangdump

    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    before = signal.getsignal(signal.SIGUSR1)
    facts = {"rank": 0, "world_size": 2, "launcher": "env"}
    try:
        hangdump.start(facts, folder=str(link), enabled=True, timeout=10.0, watchdog=0)
        assert hangdump.write_dump("test") is None
        assert list(real.iterdir()) == []
        assert "is not a plain folder" in capsys.readouterr().err
        hangdump.start(facts, folder=str(real), enabled=True, timeout=10.0, watchdog=0)
        path = hangdump.write_dump("test")
        assert path == real / "rank0.json" and path.stat().st_mode & 0o777 == 0o600
    finally:
        hangdump.stop()
    assert signal.getsignal(signal.SIGUSR1) is before


def test_hang_reports_off_means_no_setup_and_no_report() -> None:
    """DEVLAYER_HANG_REPORTS=0 (enabled=False): nothing is set up, and a failed collective
    keeps its old message (on_collective_error gives no text)."""
    from devlayer import hangdump

    facts = {"rank": 0, "world_size": 2, "launcher": "env"}
    assert hangdump.start(facts, folder=None, enabled=False, timeout=10.0, watchdog=None) is None
    assert hangdump.current_setup() is None and hangdump.on_collective_error("x") == ""


def test_a_vote_in_flight_is_not_a_wait() -> None:
    """The Trainer's non-blocking vote stays 'running' between checks: a rank whose newest
    record is such a vote is placed by its previous record and where it is, not shown as
    waiting in the vote (e.g. when a DDP gradient all_reduce, which is not in the ledger,
    is what hangs)."""
    vote = {**_rec(4, "vote_any", "running"), "detail": "async"}
    reports = {
        0: _report(
            0, _rec(3, "all_reduce"), vote, where={"function": "backward", "site": "b.py:2"}
        ),
        1: _report(1, _rec(3, "all_reduce"), vote, where={"function": "step", "site": "a.py:1"}),
    }
    text = verdict(reports, world_size=2)
    assert "waits in vote_any" not in text, text
    assert (
        "rank 1: last collective all_reduce #3 [4] float32 at t.py:13 (done); "
        "it is in step at a.py:1" in text
    )


def test_init_with_another_hang_dir_is_refused_by_name(clean_env, tmp_path: Path) -> None:
    """A second init() asking for another dump folder is an error naming both requests, not
    a silent reuse of the first folder; the same folder returns the same State."""
    import devlayer

    with devlayer.init(backend="cpu", hang_dir=tmp_path / "a") as st:
        assert devlayer.init(backend="cpu", hang_dir=str(tmp_path / "a")) is st
        with pytest.raises(devlayer.DevlayerError, match="hang_dir="):
            devlayer.init(backend="cpu", hang_dir=tmp_path / "b")


def test_a_stale_dump_from_an_earlier_run_is_not_read(tmp_path: Path) -> None:
    """A peer's dump written before this State started (an earlier run into the same
    folder) does not enter the report: that rank counts as one that left nothing."""
    from devlayer import hangdump

    stale = {**_report(1, _rec(0, "all_reduce")), "time": 1.0}
    (tmp_path / "rank1.json").write_text(json.dumps(stale))
    facts = {"rank": 0, "world_size": 2, "launcher": "env"}
    try:
        hangdump.start(facts, folder=str(tmp_path), enabled=True, timeout=4.0, watchdog=0)
        text = hangdump.on_collective_error("all_reduce")
    finally:
        hangdump.stop()
    assert "rank(s) 1 left no report" in text, text


def test_h22_26_only_a_failed_collective_becomes_a_collective_error(tmp_path: Path) -> None:
    """H22-26: an error from backward that reads as a failed collective (a timeout, a lost
    connection) becomes a CollectiveError with the hang report; any other RuntimeError (a
    shape error) is left to the caller, and nothing is wrapped with hang reports off."""
    from devlayer import hangdump

    facts = {"rank": 0, "world_size": 2, "launcher": "env", "comm": "gloo"}
    timeout = RuntimeError("[...unbound_buffer.cc:78] Timed out waiting 8000ms for recv")
    assert hangdump.comm_failure(timeout, "the gradient reduction") is None  # reports off
    hangdump.start(facts, folder=str(tmp_path), enabled=True, timeout=10.0, watchdog=0)
    try:
        shape = RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x1)")
        assert hangdump.comm_failure(shape, "the gradient reduction") is None
        err = hangdump.comm_failure(timeout, "the gradient reduction")
        assert err is not None and str(err).startswith(
            "the gradient reduction failed on rank 0 of 2 (gloo): [...unbound_buffer.cc:78] "
            "Timed out waiting 8000ms for recv. Hang report:\n"
        ), err
        lost = RuntimeError("Connection closed by peer [127.0.0.1]:4242")
        assert hangdump.comm_failure(lost, "x") is not None
    finally:
        hangdump.stop()


@pytest.mark.timeout(60)
def test_h22_8_the_watchdog_times_quiet_from_progress_not_record_times(
    monkeypatch, tmp_path
) -> None:
    """H22-8: records keep no completion time (marking one done is a single store), so the
    watchdog times quiet from when it last saw the ledger move: collectives that keep
    completing for several watchdog periods write no dump; once they stop, it dumps."""
    import threading
    import time

    from devlayer import hangdump, ledger

    dumps: list[str] = []
    monkeypatch.setattr(hangdump, "write_dump", lambda reason, frame=None: dumps.append(reason))
    monkeypatch.setattr(hangdump, "_post", lambda setup: None)
    led = ledger.new_ledger()
    setup = hangdump.HangSetup(folder=tmp_path, facts={"rank": 0}, timeout=10, watchdog=0.4)
    watcher = threading.Thread(target=hangdump._watch, args=(setup,), daemon=True)
    watcher.start()
    try:
        busy_until = time.monotonic() + 2.0  # five watchdog periods of steady progress
        while time.monotonic() < busy_until:
            ledger.Ledger.done(led.begin("all_reduce", "[1] float32"))
            time.sleep(0.02)
        assert dumps == []
        quiet_until = time.monotonic() + 10
        while not dumps and time.monotonic() < quiet_until:
            time.sleep(0.05)
        assert dumps and dumps[0].startswith("watchdog: no collective completed for 0.4s"), dumps
    finally:
        setup.stopping.set()
        watcher.join(5)
