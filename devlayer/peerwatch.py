"""The survivor watch: when a peer rank failed, the others stop instead of waiting forever.

Launchers differ in what they do with the other ranks when one exits with an error:
torchrun, ``devlayer launch``, ``srun -K`` and OpenMPI's ``mpirun`` stop them; MPICH's
``mpiexec`` (Hydra), plain ``python`` with hand-set variables, ``srun`` without ``-K`` and
pdsh do not, so a rank stuck in its own code (a loop, a blocking read) ran on forever after
the failed rank's ``CollectiveError`` had named it. With hang reports on and several ranks,
:mod:`devlayer.hangdump` starts this watch (not under torchrun's agent, which stops and
restarts its workers itself).

Two keys in the job's rendezvous store, under its attempt prefix:

* :data:`EVENT_KEY`: the first of "rank N failed" (one of its collectives failed, or an
  exception left it after ``init()``) and "rank 0, the store's host, left normally", as
  JSON; written with ``compare_set``, so the first one stays;
* :data:`RELEASED_KEY`: a counter; every rank other than the host adds 1 once, when it
  leaves (``shutdown()`` or its exit) or when its watch has read the event. The host waits
  for the others (at most :data:`HOST_WAIT_S`) before it takes the store away, so a rank
  still at work reads "left normally" before the store goes and is not stopped.

Each rank's watch thread polls :data:`EVENT_KEY` (one ``check`` every :data:`POLL_S`
seconds on a connection of its own, each bounded by :data:`POLL_TIMEOUT_S`). What it does
with what it saw is :func:`decide`, a pure function: a peer's failure, or the store gone
(:data:`GONE_AFTER` polls in a row failed while the host never said it left), stops this
rank after :data:`GRACE_S` seconds, unless this rank meanwhile raises its own error or
waits in a collective (which ends by its own timeout, with its own report): it
writes its dump with the reason, prints one line, sends itself SIGTERM (the chained
handlers run, the Trainer's preemption handler included) and, if the process still runs
:data:`HARD_EXIT_AFTER_S` seconds later, exits with :data:`EXIT_CODE`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from devlayer.net import bounded_call

__all__ = [
    "EVENT_KEY",
    "EXIT_CODE",
    "GONE_AFTER",
    "GRACE_S",
    "HARD_EXIT_AFTER_S",
    "HOST_WAIT_S",
    "JOIN_WAIT_S",
    "POLL_S",
    "POLL_TIMEOUT_S",
    "RELEASED_KEY",
    "RELEASE_WAIT_S",
    "Decision",
    "PeerWatch",
    "Seen",
    "decide",
    "failure_of",
]

#: The job's event: who failed and why, or that the store's host left normally.
EVENT_KEY = "devlayer-peer/event"
#: How many ranks other than the host have left or read the event.
RELEASED_KEY = "devlayer-peer/released"
#: Seconds between two polls of the event key.
POLL_S = 2.0
#: The longest one poll may take before it counts as failed (a host that stopped answering).
POLL_TIMEOUT_S = 10.0
#: Failed polls in a row that mean the store is gone (one slow or failed poll is not).
GONE_AFTER = 2
#: Seconds between seeing a failure and acting: a rank about to raise its own error does.
GRACE_S = 5.0
#: Seconds after its SIGTERM before a rank that still runs exits hard.
HARD_EXIT_AFTER_S = 10.0
#: The exit code of that hard exit (``EX_TEMPFAIL``: the job failed elsewhere).
EXIT_CODE = 75
#: The longest the store's host waits at its exit for the others to read its event.
HOST_WAIT_S = 3 * POLL_S + 1.0
#: The longest ``leave`` waits for the watch thread to end (it may be in a poll).
JOIN_WAIT_S = 1.0
#: The longest a rank that is not the host waits to count itself released at its exit
#: (plus one second): a host that stopped answering must not hold up ``shutdown()``.
RELEASE_WAIT_S = 2.0
#: The longest reason carried in the event.
_REASON_CHARS = 300


@dataclass(frozen=True)
class Seen:
    """What one poll of the store saw: the job's event, or the error of the poll.

    Attributes:
        event: The decoded event (``kind`` ``"failed"`` or ``"left"``, ``rank``,
            ``reason``), or None when there is none yet.
        error: The poll's error in one line, or None when it answered.
    """

    event: Mapping[str, Any] | None = None
    error: str | None = None


@dataclass(frozen=True)
class Decision:
    """What the watch does after a poll.

    Attributes:
        action: ``"watch"`` (poll again), ``"release"`` (the host left normally: count
            this rank as released and stop watching) or ``"stop"`` (stop this rank).
        reason: Why this rank stops (its dump's reason), for ``"stop"``.
        errors: Failed polls in a row so far.
    """

    action: str
    reason: str = ""
    errors: int = 0


def decide(seen: Seen, errors: int, *, rank: int, host: int, failing: bool) -> Decision:
    """What rank ``rank`` does after a poll that saw ``seen``, ``errors`` polls in a row
    having failed before it. ``host`` is the rank whose process holds the store;
    ``failing``: this rank is raising its own error (it then never stops itself).

    Example:
        >>> decide(Seen({"kind": "failed", "rank": 0, "reason": "all_reduce failed"}), 0,
        ...        rank=1, host=0, failing=False).reason
        'peer rank 0 failed: all_reduce failed'
        >>> decide(Seen(error="Broken pipe"), 0, rank=1, host=0, failing=False).action
        'watch'
        >>> decide(Seen({"kind": "left", "rank": 0}), 1, rank=1, host=0, failing=False).action
        'release'
    """
    event = seen.event
    if event is not None:
        if event.get("kind") == "left":
            return Decision("release")
        if event.get("rank") == rank or failing:
            return Decision("watch")
        return Decision("stop", f"peer rank {event.get('rank')} failed: {event.get('reason')}")
    if seen.error is None:
        return Decision("watch")
    if rank == host:  # this process holds the store: an error is not the job ending
        return Decision("watch")
    errors += 1
    if errors < GONE_AFTER or failing:
        return Decision("watch", errors=errors)
    return Decision(
        "stop",
        f"the job's store is gone: rank {host}, its host, exited or was killed without "
        f"leaving normally ({seen.error})",
        errors,
    )


def failure_of(exc_type: type[BaseException] | None, exc: BaseException | None) -> str | None:
    """The reason an exception that leaves the program (or a ``with init()`` block) makes
    this rank failed, or None when it is a normal exit (none, or ``SystemExit`` 0/None).

    Example:
        >>> failure_of(ValueError, ValueError("bad batch")), failure_of(SystemExit, SystemExit(0))
        ('ValueError: bad batch', None)
    """
    if exc_type is None:
        return None
    if issubclass(exc_type, SystemExit) and getattr(exc, "code", None) in (None, 0):
        return None
    lines = str(exc).strip().splitlines() if exc is not None else []
    text = f"{exc_type.__name__}: {lines[0]}" if lines else exc_type.__name__
    return text[:_REASON_CHARS]


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:_REASON_CHARS] if lines else type(exc).__name__


class PeerWatch:
    """One rank's side of the protocol (see the module docstring): its watch thread,
    the failure mark, the release, and the host's wait before it takes the store away.

    Args:
        store: The job's rendezvous store (this rank's main connection).
        rank: This rank.
        world: The world size.
        dump: Writes this rank's dump with a reason; returns its path (or None).
        say: Prints one line on stderr.
        host: The rank whose process holds the store (rank 0 outside torchrun).
        busy: True while this rank waits in a collective: that call ends by its own
            timeout with its own report, so the watch leaves the rank alone meanwhile.

    Raises:
        Exception: The store could not give the watch a connection of its own (the
            caller then runs without a watch).
    """

    def __init__(
        self,
        store: Any,
        rank: int,
        world: int,
        dump: Callable[[str], object],
        say: Callable[[str], None],
        host: int = 0,
        busy: Callable[[], bool] = lambda: False,
    ) -> None:
        self.store, self.rank, self.world, self.host = store, rank, world, host
        self.dump, self.say, self.busy = dump, say, busy
        self.failing = False
        self.stopping = threading.Event()
        self._released = False
        self._lock = threading.Lock()
        self._poller = store.clone()  # its own connection: polls never wait behind the main
        self._poller.set_timeout(timedelta(seconds=POLL_TIMEOUT_S))
        self.thread = threading.Thread(target=self._run, name="devlayer-peerwatch", daemon=True)

    def start(self) -> None:
        """Start the watch thread."""
        self.thread.start()

    def mark_failed(self, reason: str) -> None:
        """Record in the store that this rank failed (the first event stays)."""
        self.failing = True
        self._post("failed", reason)

    def leave(self) -> None:
        """This rank leaves (``shutdown()`` or exit): stop the watch; the host says it left
        (unless it failed) and waits, bounded, until the others read it; the others count
        themselves released."""
        self.stopping.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            # Short: once stopping is set, a poll that still returns cannot stop this rank
            # (the stop waits on stopping first); a poll on a frozen host may take its bound.
            self.thread.join(timeout=JOIN_WAIT_S)
        if self.rank != self.host:
            self._release(self.store)
            return
        if not self.failing:
            self._post("left", "")
        deadline, delay = time.monotonic() + HOST_WAIT_S, 0.002
        with contextlib.suppress(Exception):  # the others are gone or the store is: leave
            while self.store.add(RELEASED_KEY, 0) < self.world - 1:
                if time.monotonic() >= deadline:
                    return
                # Short first: ranks that shut down together release within milliseconds,
                # and one that starts again must not meet this store (its old keys) then.
                time.sleep(delay)
                delay = min(delay * 2, 0.05)

    def _post(self, kind: str, reason: str) -> None:
        text = json.dumps({"kind": kind, "rank": self.rank, "reason": reason[:_REASON_CHARS]})
        store = self.store
        with contextlib.suppress(Exception):  # gone or not answering: nobody left to tell
            bounded_call(
                lambda: store.compare_set(EVENT_KEY, "", text), time.monotonic() + RELEASE_WAIT_S
            )

    def _release(self, store: Any) -> None:
        with self._lock:
            if self._released or self.rank == self.host:
                return
            self._released = True
        with contextlib.suppress(Exception):  # TimeoutError too: a host that stopped answering
            bounded_call(lambda: store.add(RELEASED_KEY, 1), time.monotonic() + RELEASE_WAIT_S)

    def _poll(self) -> Seen:
        poller = self._poller

        def read() -> Seen:
            if not poller.check([EVENT_KEY]):
                return Seen()
            return Seen(event=json.loads(poller.get(EVENT_KEY)))

        try:
            # bounded here: torch's client ignores its timeout while the host is stopped
            seen: Seen = bounded_call(read, time.monotonic() + POLL_TIMEOUT_S - 1.0)
        except TimeoutError:
            return Seen(error=f"no answer within {POLL_TIMEOUT_S:g}s")
        except Exception as exc:  # torch's DistNetworkError & co.: the host may be gone
            return Seen(error=_one_line(exc))
        return seen

    def _run(self) -> None:
        errors = 0
        while not self.stopping.wait(POLL_S):
            seen = self._poll()
            failing = self.failing or self.busy()
            decision = decide(seen, errors, rank=self.rank, host=self.host, failing=failing)
            errors = decision.errors
            if decision.action == "release":
                self._release(self._poller)
                return
            if decision.action == "stop":
                if seen.event is not None:
                    self._release(self._poller)  # the failed host may leave now
                if self.stopping.wait(GRACE_S) or self.failing:
                    return  # it left, or it raises its own error
                if not self.busy():  # else: its collective ends it; watch on
                    self._stop_process(decision.reason)
                    return

    def _stop_process(self, reason: str) -> None:
        """Dump, one line, SIGTERM to itself, a hard exit if it still runs later."""
        path = self.dump(reason)
        written = f"hang report written to {path}" if path is not None else "no hang report"
        self.say(
            f"devlayer: rank {self.rank}: {reason}; {written}; stopping this rank (SIGTERM, "
            f"then exit code {EXIT_CODE} if it still runs {HARD_EXIT_AFTER_S:g}s later)"
        )
        _arm_hard_exit(self.rank)
        _terminate_self()


def _terminate_self() -> None:
    """SIGTERM to this process, as a launcher stops a rank: the handlers run (devlayer's,
    chained to the user's and the Trainer's; the default one ends the process)."""
    os.kill(os.getpid(), signal.SIGTERM)


def _arm_hard_exit(rank: int) -> None:
    """Exit with :data:`EXIT_CODE` :data:`HARD_EXIT_AFTER_S` seconds from now, unless the
    process has ended by then (a daemon timer)."""
    timer = threading.Timer(HARD_EXIT_AFTER_S, _exit_hard, (rank,))
    timer.daemon = True
    timer.start()


def _exit_hard(rank: int) -> None:
    print(
        f"devlayer: rank {rank}: still running {HARD_EXIT_AFTER_S:g}s after its SIGTERM; "
        f"exiting with code {EXIT_CODE}",
        file=sys.stderr,
        flush=True,
    )
    os._exit(EXIT_CODE)
