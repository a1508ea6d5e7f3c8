"""``devlayer doctor``: ``info`` plus, under a multi-rank launcher, a timed smoke test.

Each rank runs: init -> barrier -> all_reduce of a known value -> all_gather of who is
where. Rank 0 prints a verdict per rank. When a step fails, the output says which rank,
which step, and which variables to suspect. A watchdog ends the process if a step hangs in
a way the timeouts cannot catch, so doctor always finishes.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from typing import Any

import devlayer
from devlayer.cli.info import collect, text_report
from devlayer.errors import DevlayerError
from devlayer.hooks import COMM_NETWORKS, CommNetwork

__all__ = ["run", "smoke_test", "suspect"]

_SUSPECTS = {
    "launcher": "RANK / WORLD_SIZE / LOCAL_RANK, SLURM_* or OMPI_* / PMI_* (what the launcher set)",
    "rendezvous": "MASTER_ADDR, MASTER_PORT, WORLD_SIZE (and a firewall between the nodes)",
    "backend": "DEVLAYER_BACKEND, DEVLAYER_COMM and the vendor visibility variables",
}

#: gloo's interface variable: torch's own comm, in every build and under every backend.
GLOO_INTERFACE = "GLOO_SOCKET_IFNAME"


def _networks() -> list[CommNetwork]:
    """The comm libraries' network variables the backends declare, each library once, in
    the order of the comm names (whichever backend module happened to load first)."""
    # No built-ins (a checkout without install) leaves gloo's alone.
    with contextlib.suppress(DevlayerError):
        devlayer.backends.registered_backends()  # loading a backend declares its comm's
    return list(dict.fromkeys(COMM_NETWORKS[comm] for comm in sorted(COMM_NETWORKS)))


def suspect(step: str) -> str:
    """Which variables to suspect when ``step`` fails (``""`` for a step with no hint).

    The collectives' hints name gloo's interface variable and the network variables of
    every registered backend's comm library (``hooks.COMM_NETWORKS``).
    """
    if step == "barrier":
        names = [n.interface for n in _networks() if n.interface] + [GLOO_INTERFACE]
        return f"a rank stuck or dead before the barrier; {' / '.join(names)}"
    if step in ("all_reduce", "all_gather"):
        names = [f"{n.prefix}*" for n in _networks()] + [GLOO_INTERFACE]
        return f"the comm backend's network settings ({', '.join(names)})"
    return _SUSPECTS.get(step, "")


def _step(record: dict[str, Any], name: str, fn: Any) -> Any:
    started = time.perf_counter()
    try:
        value = fn()
    except Exception as exc:
        record["failed_step"] = name
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["suspect"] = suspect(name)
        raise
    finally:
        record.setdefault("timings_ms", {})[name] = round((time.perf_counter() - started) * 1000, 1)
    return value


def smoke_test(timeout: float) -> dict[str, Any]:
    """Run the multi-rank checks on this rank; returns this rank's record (and peers')."""
    record: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid()}
    try:
        st = _step(record, "rendezvous", lambda: devlayer.init(timeout=timeout))
        record.update(
            rank=st.rank,
            world_size=st.world_size,
            backend=st.backend,
            comm=st.comm,
            device=str(st.device),
        )
        _step(record, "barrier", lambda: devlayer.barrier(timeout=timeout))
        n = st.world_size
        total = _step(record, "all_reduce", lambda: devlayer.all_reduce(st.rank + 1, "sum"))
        expected = n * (n + 1) // 2
        if total != expected:
            record.update(
                failed_step="all_reduce",
                suspect=suspect("all_reduce"),
                error=f"all_reduce(rank + 1) gave {total}, expected {expected}",
            )
        peers = _step(record, "all_gather", lambda: devlayer.all_gather_object(dict(record)))
        record["peers"] = peers
    except Exception:  # _step recorded the step, the error and the suspect
        pass
    return record


def _table(peers: list[dict[str, Any]]) -> str:
    lines = [f"{'rank':>4}  {'host':<20} {'device':<10} {'comm':<6} {'verdict':<7} timings (ms)"]
    for p in peers:
        verdict = "FAIL" if p.get("failed_step") else "ok"
        times = ", ".join(f"{k} {v:g}" for k, v in p.get("timings_ms", {}).items())
        lines.append(
            f"{p.get('rank', '?'):>4}  {p.get('host', '?'):<20} "
            f"{p.get('device', '?'):<10} {p.get('comm') or '-':<6} {verdict:<7} {times}"
        )
    return "\n".join(lines)


def _watchdog(limit: float, as_json: bool) -> None:
    msg = (  # composed now: the stuck process then only prints it
        f"devlayer doctor: no result after {limit:g}s; a collective is stuck below "
        f"devlayer's timeouts. Suspect: {suspect('barrier')}"
    )

    def fire() -> None:
        if as_json:
            print(json.dumps({"ok": False, "error": msg}), flush=True)
        else:
            print(msg, file=sys.stderr, flush=True)
        os._exit(3)

    timer = threading.Timer(limit, fire)
    timer.daemon = True
    timer.start()


def run(*, as_json: bool = False, timeout: float = 30.0) -> int:
    """``devlayer doctor``: exit 0 when every check passed, 1 otherwise."""
    report = collect()
    launcher = report.get("launcher") or {}
    world = launcher.get("world_size", 1)
    if report.get("launcher_error"):
        report["smoke_test"] = {
            "failed_step": "launcher",
            "error": report["launcher_error"],
            "suspect": suspect("launcher"),
        }
        return _finish(report, as_json, ok=False, main=True)
    if world <= 1:
        report["smoke_test"] = None
        return _finish(report, as_json, ok=report["selected"] is not None, main=True)
    _watchdog(4 * timeout + 30, as_json)
    record = smoke_test(timeout)
    main = launcher.get("rank", 0) == 0
    peers = record.get("peers") or [record]
    ok = all(not p.get("failed_step") for p in peers) and len(peers) == world
    report["smoke_test"] = {
        "ranks": peers,
        "this_rank": {k: v for k, v in record.items() if k != "peers"},
    }
    if devlayer.is_initialized():
        devlayer.shutdown()
    return _finish(report, as_json, ok=ok, main=main, record=record)


def _finish(
    report: dict[str, Any],
    as_json: bool,
    *,
    ok: bool,
    main: bool,
    record: dict[str, Any] | None = None,
) -> int:
    report["ok"] = ok
    failed_here = record is not None and record.get("failed_step")
    if not (main or failed_here):
        return 0 if ok else 1
    if as_json:
        _emit(json.dumps(report, sort_keys=True, default=str))
        return 0 if ok else 1
    lines = [text_report(report)]
    smoke = report.get("smoke_test")
    if smoke and "ranks" in smoke:
        lines += ["\nsmoke test (init, barrier, all_reduce, all_gather):", _table(smoke["ranks"])]
    for p in (smoke or {}).get("ranks", [smoke] if smoke else []):
        if p and p.get("failed_step"):
            lines.append(
                f"\nFAIL on rank {p.get('rank', launcher_rank(report))} at step "
                f"{p['failed_step']!r}: {p.get('error')}\n  suspect: {p.get('suspect')}"
            )
    lines.append(f"\nverdict: {'PASS' if ok else 'FAIL'}")
    _emit("\n".join(lines))
    return 0 if ok else 1


def _emit(text: str) -> None:
    """Write ``text`` and its newline to stdout in one ``write`` call.

    Several ranks share one stdout (a launcher passes its own to every rank). ``print``
    writes the text and the newline separately when stdout is unbuffered
    (``PYTHONUNBUFFERED=1``), so two ranks' lines could end up as ``{...}{...}`` on one
    line. One ``os.write`` per report keeps each rank's output whole: a pipe write of at
    most ``PIPE_BUF`` (4 KiB on Linux) is atomic, and a failing rank's report is about
    1.5-3 KB.
    """
    data = (text + "\n").encode()
    sys.stdout.flush()  # anything printed earlier goes first
    fd = sys.stdout.fileno()
    while data:
        data = data[os.write(fd, data) :]


def launcher_rank(report: dict[str, Any]) -> Any:
    """The rank the launcher gave this process (for messages before init succeeded)."""
    return (report.get("launcher") or {}).get("rank", "?")
