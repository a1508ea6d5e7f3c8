"""The collective ledger: what this rank's last collectives were, for hang reports.

Every devlayer collective at world size > 1 (the tensor and object collectives, ``barrier``,
``vote_any``, and so the Trainer's own, which use them) appends one small record to a
bounded ring (:data:`DEFAULT_SIZE` records per ``State``): its sequence number (the same on
every rank that runs the same program), the operation, a cheap signature (a tensor's shape
and dtype, a container's type and size), the user's call site (the first frame outside the
devlayer package), its start ``time.monotonic()`` (and the time it failed) and a state
(``running``, ``done``, ``failed``). Nothing here is a collective or touches torch: a
record is a Python list, and the call site is kept as a code object and the instruction
offset in it (``f_lasti``), never the frame: the line number and the ``file.py:line`` text
are worked out only when a report is written (:meth:`Ledger.tail`). Callers that know how
many devlayer frames lie between them and the user pass ``depth``, so that only the user's
frame is looked at (each frame looked at costs a frame object; ``docs/performance.md`` has
the figures). :mod:`devlayer.hangdump` writes the tail into hang reports.

The Trainer publishes its optimizer step with :func:`publish_step` (one assignment).

Example:
    >>> led = Ledger(size=2)
    >>> for op in ("all_reduce", "broadcast", "barrier"):
    ...     led.done(led.begin(op, "[4] float32"))
    >>> [(r["seq"], r["op"], r["state"]) for r in led.tail()]
    [(1, 'broadcast', 'done'), (2, 'barrier', 'done')]
"""

from __future__ import annotations

import os
import sys
from collections import deque
from time import monotonic
from types import CodeType
from typing import Any

__all__ = [
    "DEFAULT_SIZE",
    "DONE",
    "END",
    "FAILED",
    "OP",
    "RUNNING",
    "SEQ",
    "START",
    "STATE",
    "Ledger",
    "current",
    "describe",
    "first_outside",
    "line_of",
    "new_ledger",
    "publish_step",
    "published_step",
]

#: Records kept per State: what a dump holds (``hangdump.DUMP_RECORDS``), enough to see
#: where ranks diverged. Not more: records evicted long after they were made cost cache
#: misses on the per-call path (a ring of 256 measured about 0.5 point of a 4 B all_reduce
#: more than one of 64; docs/performance.md).
DEFAULT_SIZE = 64

RUNNING, DONE, FAILED = "running", "done", "failed"

#: Record fields (a list, the cheapest record to build on the per-call path); readers index
#: records by these names. AT is the call site's instruction offset in CODE (a frame's
#: f_lasti), turned into a line by line_of(). END is set only when a record fails: marking
#: one done is a single store (no clock read on the per-call path); the watchdog times quiet
#: periods by watching :attr:`Ledger.n` and the newest record's state instead.
SEQ, OP, DETAIL, CODE, AT, START, END, STATE = range(8)

#: Frames from files under this folder are devlayer's; the call site is the first other one.
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep

_step: list[int | None] = [None]

_getframe = sys._getframe  # one global lookup on the per-call path, not two


class Ledger:
    """A bounded ring of this rank's collective records (see the module docstring).

    Args:
        size: How many records to keep (the oldest are dropped).
    """

    __slots__ = ("_append", "_detail", "n", "records")

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        self.records: deque[list[Any]] = deque(maxlen=size)
        self._append = self.records.append
        self._detail: object = None  # the last signature kept (see begin)
        #: The sequence number of the next record (how many were begun).
        self.n = 0

    def begin(self, op: str, detail: object = None, depth: int = 1) -> list[Any]:
        """Record collective ``op`` as running; returns the record for :meth:`done`/:meth:`fail`.

        Args:
            op: The operation, e.g. ``"all_reduce"``.
            detail: Its signature: text, or a ``(shape, dtype)`` pair formatted only when a
                report is written (a tensor's shape costs nothing to keep).
            depth: How many frames up the search for the user's frame starts (1: the
                caller of ``begin``). It must not pass the user's frame: from there, devlayer
                frames are skipped, so a depth that stops inside devlayer (a devlayer module
                calling the public function) is still right.
        """
        frame = _getframe(depth)  # only this frame becomes a frame object, not those below
        code = frame.f_code
        if code.co_filename.startswith(_PACKAGE):  # a devlayer module called the collective
            frame = first_outside(frame) or frame
            code = frame.f_code
        if detail == self._detail:  # the same signature as the last call (the usual case):
            detail = self._detail  # keep one object, not one per record (fewer cold objects)
        else:
            self._detail = detail
        seq = self.n
        self.n = seq + 1
        rec = [seq, op, detail, code, frame.f_lasti, monotonic(), 0.0, RUNNING]
        self._append(rec)
        return rec

    def begin_at(self, op: str, detail: object, code: CodeType, at: int) -> list[Any]:
        """:meth:`begin` with the call site given: ``code`` and the offset ``at`` in it.

        For collectives started where the user's frame is not simply up the caller's
        stack, such as DDP's gradient all_reduce, started by its comm hook inside autograd
        (:mod:`devlayer.train.commhooks` finds the site). Not thread-safe against
        :meth:`begin`, and need not be: see that module's docstring.

        Args:
            op: The operation, e.g. ``"ddp all_reduce"``.
            detail: Its signature (as for :meth:`begin`).
            code: The code object of the user's frame.
            at: The instruction offset in ``code`` (the frame's ``f_lasti``).
        """
        seq = self.n
        self.n = seq + 1
        rec = [seq, op, detail, code, at, monotonic(), 0.0, RUNNING]
        self._append(rec)
        return rec

    @staticmethod
    def done(rec: list[Any]) -> None:
        """Mark ``rec`` completed (one store: the hot paths in ``comm`` inline it)."""
        rec[STATE] = DONE

    @staticmethod
    def fail(rec: list[Any]) -> None:
        """Mark ``rec`` failed (an error or a timeout ended it)."""
        rec[END] = monotonic()
        rec[STATE] = FAILED

    def last(self) -> list[Any] | None:
        """The newest record, or None."""
        records = self.records
        return records[-1] if records else None

    def tail(self, count: int | None = None) -> list[dict[str, Any]]:
        """The newest ``count`` records (default: all kept), oldest first, as JSON-ready dicts.

        Each: ``seq``, ``op``, ``detail``, ``site`` (``file.py:line``), ``function``,
        ``file`` (its path), ``state``, ``started`` (``time.monotonic()``) and ``ended``
        (when it failed; None while running or done).
        """
        records = list(self.records)
        if count is not None:
            records = records[-count:] if count > 0 else []
        return [_as_dict(rec) for rec in records]


def first_outside(frame: Any, folders: tuple[str, ...] = (_PACKAGE,)) -> Any:
    """The first frame at or above ``frame`` whose file is in none of ``folders``.

    The one walk up a stack that the call sites share: the ledger's (off its hot path),
    the collectives' signature checks, DDP's comm hook (devlayer's and torch's folders) and
    the hang dump's "where" (the standard library's too).

    Args:
        frame: A frame (anything with ``f_code.co_filename`` and ``f_back``), or None.
        folders: Path prefixes whose frames are passed over (default: devlayer's package).

    Returns:
        That frame, or None when every frame up the stack is in ``folders``.

    Example:
        >>> from types import SimpleNamespace as F
        >>> user = F(f_code=F(co_filename="/home/me/train.py"), f_back=None)
        >>> hook = F(f_code=F(co_filename="/lib/torch/autograd.py"), f_back=user)
        >>> first_outside(hook, ("/lib/torch/",)) is user, first_outside(user, ("/home/",))
        (True, None)
    """
    while frame is not None and frame.f_code.co_filename.startswith(folders):
        frame = frame.f_back
    return frame


def _as_dict(rec: list[Any]) -> dict[str, Any]:
    code = rec[CODE]
    return {
        "seq": rec[SEQ],
        "op": rec[OP],
        "detail": describe(rec[DETAIL]),
        "site": f"{os.path.basename(code.co_filename)}:{line_of(code, rec[AT])}",
        "function": code.co_name,
        "file": code.co_filename,
        "state": rec[STATE],
        "started": rec[START],
        "ended": rec[END] if rec[STATE] == FAILED else None,
    }


def line_of(code: CodeType, offset: int) -> int:
    """The source line of instruction ``offset`` (a frame's ``f_lasti``) in ``code``.

    What ``frame.f_lineno`` gives, worked out from the code object alone, after the frame
    is gone (0 when the offset maps to no line).

    Example:
        >>> import sys
        >>> frame = sys._getframe()
        >>> line_of(frame.f_code, frame.f_lasti) == frame.f_lineno
        True
    """
    for start, end, line in code.co_lines():
        if start <= offset < end:
            return line if line is not None else 0
    return code.co_firstlineno if offset < 0 else 0


def describe(detail: object) -> str:
    """A record's signature as text: ``[4] float32`` for a ``(shape, dtype)`` pair.

    Example:
        >>> describe(((2, 3), "torch.float32")), describe("dict of 3"), describe(None)
        ('[2, 3] float32', 'dict of 3', '')
    """
    if detail is None:
        return ""
    if isinstance(detail, tuple) and len(detail) == 2:
        shape, dtype = detail
        return f"{list(shape)} {str(dtype).replace('torch.', '')}"
    return str(detail)


_current: Ledger | None = None


def new_ledger(size: int = DEFAULT_SIZE) -> Ledger:
    """A fresh ledger that :func:`current` returns from now on (one per ``State``)."""
    global _current
    _current = Ledger(size)
    return _current


def current() -> Ledger | None:
    """The ledger of the current (or last) ``State``; None before any collective context."""
    return _current


def publish_step(step: int | None) -> None:
    """Tell hang reports the training step this rank is at (the Trainer calls it per step).

    Example:
        >>> publish_step(12); published_step()
        12
        >>> publish_step(None)
    """
    _step[0] = step


def published_step() -> int | None:
    """The step last given to :func:`publish_step`, or None."""
    return _step[0]
