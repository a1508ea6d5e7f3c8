"""Hang dumps: each rank writes where it is, when it matters, so a hang names its rank.

A dump is one JSON file per rank, ``rank<N>.json`` (0600, written to a temp file and
renamed, never pickle), holding every thread's Python stack, the tail of the collective
ledger (:mod:`devlayer.ledger`), ``where`` (the innermost frame of the main thread outside
devlayer, torch and the standard library) and what devlayer knows: rank, world size,
host, pid, backend, comm, device, launcher, the Trainer's step. It is written:

* when a collective fails or times out (:func:`on_collective_error`, from
  :mod:`devlayer.comm`'s error path), which also posts this rank's position to the
  rendezvous store and, after a short bounded grace, reads the other ranks' positions and
  dumps to name who is missing and where;
* on SIGTERM and SIGINT (the launcher's stop: torchrun waits 30 s before SIGKILL) and on
  SIGUSR1 (the process goes on). The handlers are installed by ``init()`` in the main
  thread, call the handler that was there before (torch's, the user's: SIGTERM's default
  still ends the process), and ``shutdown()`` puts the old ones back;
* by a watchdog thread when no collective has completed for ``DEVLAYER_WATCHDOG`` seconds
  (default: the collective timeout), whether one is pending or the rank is elsewhere,
  so a rank stuck in user code leaves its stack before the others time out. It adds no
  collective, says so once per quiet period, refreshes the dump and the posted position
  every ``DEVLAYER_WATCHDOG`` seconds while the quiet lasts, and stops at ``shutdown()``;
* by the survivor watch (:mod:`devlayer.peerwatch`, ``DEVLAYER_PEER_WATCH``) when a peer
  rank failed or the job's store is gone, before it stops this rank. A failed collective
  and an exception that leaves the program (``sys.excepthook``, chained) or a ``with
  init()`` block mark this rank failed in the store; ``shutdown()`` and the exit
  (``atexit``) let the others know that it left normally.

The folder is ``init(hang_dir=...)``, ``DEVLAYER_HANG_DIR``, or by default
``<temp>/devlayer-hangs-<uid>/<launcher>-<job>`` on local disk (:func:`default_dir`); each
rank removes its own stale dump at ``init()``, so a job with no hang leaves none.
``DEVLAYER_HANG_REPORTS=0`` turns dumps, handlers, the watchdog and the survivor watch off;
at world size 1 (no peer to wait for) none of them is set up.

Where the comm backend has torch's flight recorder (a vendor declares it with
:func:`devlayer.hooks.register_flight_recorder`), ``init()`` turns it on with cheap
settings before the process group exists (:func:`arm_flight_recorder`), its dump files in
the same folder, unless the user set those variables; the reports name its file.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import re
import signal
import stat
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from devlayer.errors import CollectiveError
from devlayer.hangreport import DUMP_FORMAT, read_dumps, verdict
from devlayer.hooks import FLIGHT_RECORDERS
from devlayer.ledger import (
    DEFAULT_SIZE,
    OP,
    RUNNING,
    SEQ,
    START,
    STATE,
    current,
    first_outside,
    new_ledger,
    publish_step,
    published_step,
)
from devlayer.net import bounded_call
from devlayer.peerwatch import PeerWatch, failure_of

__all__ = [
    "HangSetup",
    "arm_flight_recorder",
    "comm_failure",
    "current_setup",
    "default_dir",
    "dump_handler_of",
    "dump_only",
    "flight_recorder_path",
    "folder_for",
    "mark_failed",
    "on_collective_error",
    "report",
    "start",
    "stop",
    "waits_on",
    "where",
    "write_dump",
]

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")
#: How many ledger records a dump holds, and a store post.
DUMP_RECORDS, POST_RECORDS = DEFAULT_SIZE, 8  # a dump holds the whole ring
_POST_KEY = "devlayer-hang/pos/"
_COUNT_KEY = "devlayer-hang/posted"
#: Seconds a peer's clock may lag this one's before its dump counts as older than this job.
_CLOCK_SLACK = 60.0


@dataclass
class HangSetup:
    """What the hang reports of one ``State`` need (made by ``init()``).

    Attributes:
        folder: Where the dumps go.
        facts: Rank, world size, host, pid, backend, comm, device, launcher, job.
        timeout: The collective timeout in seconds.
        watchdog: Seconds without a completed collective before a dump; 0: off.
        store: The rendezvous store (positions are posted there), or None.
        peers: The survivor watch, or None (off, no store, or under torchrun).
        stop_reason: Why the survivor watch stops this rank, once it does.
    """

    folder: Path
    facts: dict[str, Any]
    timeout: float
    watchdog: float
    store: Any = None
    peers: PeerWatch | None = None
    stop_reason: str | None = None
    previous: dict[int, Any] = field(default_factory=dict)
    thread: threading.Thread | None = None
    stopping: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.monotonic)
    wall_started: float = field(default_factory=time.time)


_setup: HangSetup | None = None


def default_dir(launcher: str, job: str | None, port: int | None, tmp: str | None = None) -> Path:
    """``<temp>/devlayer-hangs-<uid>/<launcher>-<job id or port>``: one folder per job.

    Example:
        >>> default_dir("slurm", "SLURM_JOB_ID=42", 29500, tmp="/tmp").name
        'slurm-SLURM_JOB_ID-42'
    """
    name = f"{launcher}-{job or f'port{port}'}"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "job"
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tmp or tempfile.gettempdir()) / f"devlayer-hangs-{uid}" / name


def folder_for(folder: str | None, facts: Mapping[str, Any]) -> Path:
    """The dumps' folder: ``folder`` when given, else :func:`default_dir` of the job in
    ``facts`` (``launcher``, ``job_id``, ``port``)."""
    if folder:
        return Path(folder)
    return default_dir(facts["launcher"], facts.get("job_id"), facts.get("port"))


# --------------------------------------------------------------------------- flight recorder


def arm_flight_recorder(
    comm: str, folder: Path, env: Mapping[str, str], setenv: Callable[[str, str], None]
) -> None:
    """Turn torch's flight recorder of ``comm`` on, before its process group exists.

    Sets, with ``setenv``, the cheap settings its vendor declared and the dump file's prefix
    in ``folder`` (made here, 0700, for torch to write into), each unless the user set one
    of its spellings in ``env``. A comm with no recorder, or a folder that is not this
    user's, gets nothing (the reason goes to stderr): the recorder is never required.
    """
    recorder = FLIGHT_RECORDERS.get(comm)
    if recorder is None:
        return
    try:
        _own_folder(folder)
    except OSError as exc:
        print(f"devlayer: torch's flight recorder left as it is: {exc}", file=sys.stderr)
        return
    for name, value in recorder.settings_for(str(folder), env).items():
        setenv(name, value)


def flight_recorder_path(comm: str | None, rank: int, env: Mapping[str, str]) -> str | None:
    """Where torch's flight recorder of ``comm`` writes rank ``rank``'s dump under ``env``,
    or None (no recorder for ``comm``, no file named, or turned off)."""
    recorder = FLIGHT_RECORDERS.get(comm or "")
    return recorder.dump_path(env, rank) if recorder is not None else None


# --------------------------------------------------------------------------- the dump


def _not_users() -> tuple[str, ...]:
    """Folders whose frames are not the user's: devlayer's, torch's (when imported), the
    standard library's, and frozen modules (``<frozen ...>``)."""
    torch = sys.modules.get("torch")
    torch_file = getattr(torch, "__file__", None)
    torch_dir = (os.path.dirname(os.path.abspath(torch_file)) + os.sep,) if torch_file else ()
    return (_PACKAGE, *torch_dir, _stdlib(), "<frozen")


@functools.cache
def _stdlib() -> str:
    """The standard library's folder (asked once, when a report is first made)."""
    import sysconfig

    return str(sysconfig.get_paths()["stdlib"]) + os.sep


def where(frame: FrameType | None) -> dict[str, Any] | None:
    """The innermost frame at or above ``frame`` that is the user's: function and site."""
    frame = first_outside(frame, _not_users()) or frame
    if frame is None:
        return None
    code = frame.f_code
    return {
        "function": code.co_name,
        "site": f"{os.path.basename(code.co_filename)}:{frame.f_lineno}",
        "file": code.co_filename,
    }


_DATALOADER = os.path.join("torch", "utils", "data", "dataloader.py")
_JOINS = ("join", "_wait_for_tstate_lock")


def waits_on(main: FrameType | None) -> dict[str, Any] | None:
    """What the main thread at ``main`` waits on, when a frame of its stack shows it: a
    DataLoader's worker processes (their pids, when its iterator has them) or another
    thread that it joins (its name and where that thread is); None otherwise."""
    frame = main
    while frame is not None:
        code = frame.f_code
        if code.co_filename.endswith(_DATALOADER):
            workers = getattr(frame.f_locals.get("self"), "_workers", None) or ()
            return {"kind": "DataLoader", "workers": [w.pid for w in workers if w.pid]}
        if code.co_name in _JOINS and code.co_filename == threading.__file__:
            thread = frame.f_locals.get("self")
            if isinstance(thread, threading.Thread):
                inner = sys._current_frames().get(thread.ident or 0)
                return {"kind": "thread", "thread": thread.name, "where": where(inner)}
        frame = frame.f_back
    return None


def _threads(main_frame: FrameType | None) -> list[dict[str, Any]]:
    names = {t.ident: t.name for t in threading.enumerate()}
    main = threading.main_thread().ident
    out = []
    for ident, frame in sys._current_frames().items():
        if ident == main and main_frame is not None:
            frame = main_frame
        stack = [
            {"file": f.filename, "line": f.lineno, "function": f.name, "text": f.line or ""}
            for f in traceback.extract_stack(frame)
        ]
        out.append(
            {"id": ident, "name": names.get(ident, "?"), "main": ident == main, "stack": stack}
        )
    return out


def _main_frame(frame: FrameType | None) -> FrameType | None:
    """The main thread's frame: ``frame`` when called there (a signal handler's), else its
    current frame as another thread sees it."""
    if frame is not None and threading.current_thread() is threading.main_thread():
        return frame
    return sys._current_frames().get(threading.main_thread().ident or 0)


def report(
    reason: str, frame: FrameType | None = None, records: int = DUMP_RECORDS
) -> dict[str, Any]:
    """This rank's report as a JSON-ready dict (see the module docstring)."""
    setup = _setup
    led = current()
    main = _main_frame(frame)
    doc: dict[str, Any] = {
        "format": DUMP_FORMAT,
        "reason": reason,
        **(setup.facts if setup is not None else {}),
        "pid": os.getpid(),
        "step": published_step(),
        "time": time.time(),
        "monotonic": time.monotonic(),
        "ledger": led.tail(records) if led is not None else [],
        "where": where(main),
        "waits_on": waits_on(main),
    }
    return doc


def write_dump(reason: str, frame: FrameType | None = None) -> Path | None:
    """Write this rank's dump (with every thread's stack) atomically, 0600.

    Returns:
        Its path, or None when hang reports are off or the folder cannot be written (a dump
        must never turn a hang into another error; the reason goes to stderr).
    """
    setup = _setup
    if setup is None:
        return None
    doc = report(reason, frame)
    doc["threads"] = _threads(_main_frame(frame))
    path = setup.folder / f"rank{setup.facts.get('rank', 0)}.json"
    try:
        _atomic_write(path, json.dumps(doc, indent=1, default=str))
    except OSError as exc:
        print(f"devlayer: could not write the hang dump {path}: {exc}", file=sys.stderr)
        return None
    return path


def _own_folder(folder: Path) -> None:
    """Make ``folder`` (0700) and check that it, and the default's shared parent, are ours."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_ours(folder)
    if folder.parent.name.startswith("devlayer-hangs-"):
        _check_ours(folder.parent)  # the default folder's shared parent in <temp>


def _atomic_write(path: Path, text: str) -> None:
    _own_folder(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # 0600
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_ours(folder: Path) -> None:
    """Refuse a folder that is a link or another user's (a planted one in a shared temp).

    Raises:
        OSError: Naming the folder, what it is and the fix.
    """
    st = os.lstat(folder)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise OSError(f"{folder} is not a plain folder (a link?); set DEVLAYER_HANG_DIR")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise OSError(
            f"{folder} belongs to user id {st.st_uid}, not to this user ({os.getuid()}); "
            f"set DEVLAYER_HANG_DIR to a folder of your own"
        )


# --------------------------------------------------------------------------- signals


def _on_signal(signum: int, frame: FrameType | None) -> None:
    setup = _setup
    name = signal.Signals(signum).name
    if _sent_by_the_watch(setup, signum):  # its dump and its line are out already
        _chain(signum, frame, setup.previous.get(signum) if setup is not None else None)
        return
    path = write_dump(f"signal {name}", frame)
    if path is not None and setup is not None:
        print(
            f"devlayer: rank {setup.facts.get('rank')}: {name}: hang report written to {path} "
            f"(read them all with: devlayer hangs {setup.folder})",
            file=sys.stderr,
            flush=True,
        )
    previous = setup.previous.get(signum) if setup is not None else None
    _chain(signum, frame, previous)


def _chain(signum: int, frame: FrameType | None, previous: Any) -> None:
    """Hand the signal on as if devlayer's handler were not there."""
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_DFL and signum != signal.SIGUSR1:
        signal.signal(signum, signal.SIG_DFL)  # the default action: end the process
        os.kill(os.getpid(), signum)


def _sent_by_the_watch(setup: HangSetup | None, signum: int) -> bool:
    """True for the SIGTERM the survivor watch sent after writing its own dump."""
    return setup is not None and setup.stop_reason is not None and signum == signal.SIGTERM


def dump_only(signum: int, frame: FrameType | None) -> None:
    """Write the dump for ``signum`` without handing it on (for a handler that replaces
    devlayer's for a while, such as the Trainer's preemption handler)."""
    if not _sent_by_the_watch(_setup, signum):
        write_dump(f"signal {signal.Signals(signum).name}", frame)


def dump_handler_of(handler: object) -> Callable[[int, FrameType | None], None] | None:
    """:func:`dump_only` when ``handler`` is devlayer's signal handler, else None.

    Example:
        >>> dump_handler_of(signal.SIG_DFL) is None
        True
    """
    return dump_only if handler is _on_signal else None


def _install(setup: HangSetup) -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers; dumps still come from the rest
    for name in _SIGNALS:
        signum = getattr(signal, name, None)
        if signum is not None:
            setup.previous[signum] = signal.signal(signum, _on_signal)


def _uninstall(setup: HangSetup) -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for signum, previous in setup.previous.items():
        if signal.getsignal(signum) is _on_signal:  # a handler set after ours stays
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
    setup.previous.clear()


# --------------------------------------------------------------------------- watchdog


def _progress() -> tuple[tuple[int, str | None], Any]:
    """How far this rank's ledger is (records begun, the newest one's state), and that record.

    A collective that starts or completes changes it; the watchdog times quiet periods from
    when it last saw it change (records keep no completion time: marking one done is a single
    store on the per-call path).
    """
    led = current()
    last = led.last() if led is not None else None
    return (led.n if led is not None else 0, last[STATE] if last is not None else None), last


def _watch(setup: HangSetup) -> None:
    """Dump and post once no collective completed for ``setup.watchdog`` seconds (said on
    stderr once per quiet period), then refresh both every ``setup.watchdog`` seconds while
    the quiet lasts: a rank that moved on (from set-up into a training step that hangs,
    with no devlayer collective between) is then shown where it is now.

    Quiet is timed from the tick at which the ledger was last seen to move (or, for a
    collective still running, from its start), so to within one tick (at most 1 s).
    """
    tick = min(1.0, setup.watchdog / 10)
    fired_for: object = None
    fired_at = 0.0
    seen, since = _progress()[0], setup.started
    while not setup.stopping.wait(tick):
        if setup.stop_reason is not None:
            return  # the survivor watch stops this rank: its dump and reason stay
        mark, last = _progress()
        now = time.monotonic()
        if mark != seen:
            seen = mark
            since = last[START] if last is not None and last[STATE] == RUNNING else now
            since = max(since, setup.started)
        key = (mark, since)
        if now - since < setup.watchdog or (key == fired_for and now - fired_at < setup.watchdog):
            continue
        first, fired_for, fired_at = key != fired_for, key, now
        pending = (
            f"; pending: {last[OP]} #{last[SEQ]}"
            if last is not None and last[STATE] == RUNNING
            else ""
        )
        path = write_dump(f"watchdog: no collective completed for {setup.watchdog:g}s{pending}")
        _post(setup)
        if path is not None and first:
            print(
                f"devlayer: rank {setup.facts.get('rank')}: no collective completed for "
                f"{setup.watchdog:g}s{pending}; hang report written to {path}",
                file=sys.stderr,
                flush=True,
            )


# --------------------------------------------------------------------------- store


#: The longest posting this rank's position may take (plus one second): torch's store
#: client does not honour its timeout while the store's host is stopped or its node lost.
POST_WAIT_S = 3.0


def _post(setup: HangSetup) -> None:
    """Post this rank's position (a small report) to the store, bounded by
    :data:`POST_WAIT_S`; errors are ignored."""
    store = setup.store
    if store is None:
        return
    text = json.dumps(report("posted", None, POST_RECORDS), default=str)
    key = f"{_POST_KEY}{setup.facts['rank']}"

    def post() -> None:
        first = not store.check([key])
        store.set(key, text)
        if first:
            store.add(_COUNT_KEY, 1)

    with contextlib.suppress(Exception):  # the store's host may be gone: the report says less
        bounded_call(post, time.monotonic() + POST_WAIT_S)


def _posts(setup: HangSetup, grace: float) -> dict[int, dict[str, Any]]:
    """The positions the ranks posted, waiting up to ``grace`` seconds for all of them.

    The wait polls one counter (every post adds 1), so the store sees one request per
    waiting rank per 0.1 s whatever the world size; the posts are then read once.
    """
    world = int(setup.facts["world_size"])
    deadline = time.monotonic() + grace
    found: dict[int, dict[str, Any]] = {}
    store = setup.store

    def gather() -> None:
        while store.add(_COUNT_KEY, 0) < world and time.monotonic() < deadline:
            time.sleep(0.1)
        for r in range(world):
            key = f"{_POST_KEY}{r}"
            if store.check([key]):
                found[r] = json.loads(store.get(key))

    # bounded: a store host that stopped answering must not keep this rank from its error
    with contextlib.suppress(Exception):  # the store's host went away: report what was read
        bounded_call(gather, deadline + POST_WAIT_S)
    return dict(found)


def on_collective_error(what: str) -> str:
    """After collective ``what`` failed: dump, post, gather the others' positions; the report.

    Returns:
        Text for the ``CollectiveError`` (empty when hang reports are off): the ranks that
        did not reach the collective with where they are, different collectives at one
        sequence number, the ranks that left nothing, and where the dumps are.
    """
    setup = _setup
    if setup is None:
        return ""
    if setup.peers is not None:
        setup.peers.failing = True  # this rank raises its own error: its watch never acts
    path = write_dump(f"{what} failed")
    _post(setup)
    reports: dict[int, dict[str, Any]] = {}
    if setup.store is not None:
        reports.update(_posts(setup, grace=min(10.0, max(1.0, setup.timeout / 4))))
    dumps, _ = read_dumps(setup.folder)
    oldest = setup.wall_started - _CLOCK_SLACK  # a dump from before this State is stale
    for r, doc in dumps.items():
        newer = r not in reports or doc.get("time", 0) > reports[r].get("time", 0)
        if newer and doc.get("time", 0) >= oldest:
            reports[r] = doc
    world = int(setup.facts["world_size"])
    text = verdict(reports, world)
    if setup.peers is not None:  # after the gathering: a stopped store host would end it
        setup.peers.mark_failed(f"{what} failed on rank {setup.facts['rank']} of {world}")
    where_ = f"; this rank's dump: {path}" if path is not None else ""
    return f"Hang report:\n{text}\n(dumps in {setup.folder}{where_}; devlayer hangs {setup.folder})"


#: What torch's errors from a failed collective say (their types are plain RuntimeError
#: from the backward of DDP, or torch.distributed's Dist*Error).
_COMM_WORDS = re.compile(r"timed out|timeout|connection (closed|reset|refused)|broken pipe", re.I)


def _looks_like_comm(exc: BaseException) -> bool:
    names = [c.__name__ for c in type(exc).__mro__ if c.__module__.startswith("torch")]
    return any(n.startswith("Dist") for n in names) or bool(_COMM_WORDS.search(str(exc)))


def comm_failure(exc: BaseException, what: str) -> CollectiveError | None:
    """The error for a collective devlayer did not call that failed with ``exc`` (DDP's
    gradient all_reduce in backward, say): a :class:`CollectiveError` naming ``what``,
    keeping torch's message, with the hang report (:func:`on_collective_error`).

    Returns:
        None when hang reports are off or ``exc`` does not look like a failed collective
        (a timeout or a lost connection): the caller then raises ``exc`` as it is.
    """
    setup = _setup
    if setup is None or not _looks_like_comm(exc):
        return None
    report = on_collective_error(what)
    facts = setup.facts
    return CollectiveError(
        f"{what} failed on rank {facts['rank']} of {facts['world_size']} ({facts['comm']}): "
        f"{exc}. {report}"
    )


# --------------------------------------------------------------------------- lifecycle


def start(
    facts: Mapping[str, Any],
    *,
    folder: str | None,
    enabled: bool,
    timeout: float,
    watchdog: float | None,
    store: Any = None,
    peer_watch: bool = False,
) -> HangSetup | None:
    """Set up hang reports for a new ``State`` (``init()`` calls it): folder, handlers,
    watchdog and, with ``peer_watch`` and a ``store``, the survivor watch
    (:mod:`devlayer.peerwatch`). Removes this rank's stale dump from an earlier run.

    Returns:
        The setup, or None when ``enabled`` is False or the world has one rank.
    """
    global _setup
    stop()
    new_ledger()  # a new State: no record of the previous one in its reports
    publish_step(None)
    if not enabled or int(facts["world_size"]) < 2:
        return None  # one process has no peer to wait for: no handlers, no watchdog
    fact = dict(facts)
    where_ = folder_for(folder, fact)
    fact["flight_recorder"] = flight_recorder_path(fact.get("comm"), fact["rank"], os.environ)
    seconds = timeout if watchdog is None else watchdog
    setup = HangSetup(where_, fact, timeout, seconds, store)
    with contextlib.suppress(OSError):  # a folder that is not ours: write_dump will say so
        (where_ / f"rank{fact['rank']}.json").unlink(missing_ok=True)
    _setup = setup
    _install(setup)
    if peer_watch and store is not None:
        _start_peer_watch(setup)
    if seconds > 0:
        setup.thread = threading.Thread(
            target=_watch, args=(setup,), name="devlayer-watchdog", daemon=True
        )
        setup.thread.start()
    return setup


def stop() -> None:
    """Undo :func:`start`: stop the watchdog, put the old signal handlers back."""
    global _setup
    setup, _setup = _setup, None
    if setup is None:
        return
    setup.stopping.set()
    peers, setup.peers = setup.peers, None  # no cycle keeps the store alive after this
    if peers is not None:
        peers.leave()  # the store's host waits (bounded) until the others know
        _unhook_exits()
    _uninstall(setup)
    if setup.thread is not None and setup.thread is not threading.current_thread():
        setup.thread.join(timeout=5)


# --------------------------------------------------------------------------- survivor watch


def _start_peer_watch(setup: HangSetup) -> None:
    """Start :class:`~devlayer.peerwatch.PeerWatch` for ``setup`` and the exit hooks that
    tell the other ranks how this one ends."""
    rank = int(setup.facts["rank"])

    def dump(reason: str) -> Path | None:
        setup.stop_reason = reason  # the SIGTERM that follows keeps this dump and reason
        return write_dump(reason)

    try:
        world = int(setup.facts["world_size"])
        busy = functools.partial(_in_collective, setup)
        watch = PeerWatch(setup.store, rank, world, dump, _say, busy=busy)
    except Exception as exc:  # a store that cannot give a second connection: no watch
        _say(f"devlayer: rank {rank}: no survivor watch (the store refused a connection: {exc})")
        return
    setup.peers = watch
    _hook_exits()
    watch.start()


def _in_collective(setup: HangSetup) -> bool:
    """True while this rank's newest ledger record is a collective still running that its
    timeout will end: one running for longer than the timeout and the report's gathering
    (10 s) does not end by itself, and does not keep the survivor watch away."""
    led = current()
    last = led.last() if led is not None else None
    if last is None or last[STATE] != RUNNING:
        return False
    return time.monotonic() - last[START] < setup.timeout + 10.0


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


_previous_excepthook: Callable[..., Any] | None = None
_exit_hooked = False


def _hook_exits() -> None:
    """Chain ``sys.excepthook`` (an uncaught exception marks this rank failed) and register,
    once per process, the exit hook that leaves as ``shutdown()`` does."""
    global _previous_excepthook, _exit_hooked
    if sys.excepthook is not _on_uncaught:
        _previous_excepthook = sys.excepthook
        sys.excepthook = _on_uncaught
    if not _exit_hooked:
        _exit_hooked = True
        atexit.register(_at_exit)


def _unhook_exits() -> None:
    if sys.excepthook is _on_uncaught:  # a hook set after ours stays
        sys.excepthook = _previous_excepthook or sys.__excepthook__


def _on_uncaught(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
    mark_failed(exc_type, exc)
    (_previous_excepthook or sys.__excepthook__)(exc_type, exc, tb)


def _at_exit() -> None:
    """At the interpreter's exit without ``shutdown()``: leave as it would."""
    if _setup is not None:
        stop()


def mark_failed(exc_type: type[BaseException] | None, exc: BaseException | None) -> None:
    """Mark this rank failed in the job's store when ``exc`` ends it (an uncaught exception,
    or one that leaves a ``with devlayer.init()`` block); a normal exit
    (:func:`devlayer.peerwatch.failure_of` is None) and a rank already marked add nothing.
    """
    setup = _setup
    reason = failure_of(exc_type, exc)
    if setup is None or setup.peers is None or reason is None or setup.peers.failing:
        return
    setup.peers.mark_failed(f"it raised {reason}")


def current_setup() -> HangSetup | None:
    """The setup of the current ``State``, or None."""
    return _setup
