"""One verdict from the ranks' hang reports: which rank is where, who diverged, who is gone.

:func:`verdict` is a pure function of the reports (the JSON dumps :mod:`devlayer.hangdump`
writes, or the smaller positions ranks post to the rendezvous store); :func:`read_dumps`
loads a dump folder (JSON only, never pickle). ``devlayer hangs DIR`` prints
:func:`verdict` of :func:`read_dumps`, and the ``CollectiveError`` of a timed-out rank
carries it.

A report is a dict with ``rank``, ``world_size``, ``ledger`` (the newest collective
records, oldest first: ``seq``, ``op``, ``detail``, ``site``, ``state``) and ``where``
(the innermost frame of the main thread outside devlayer, torch and the standard library:
``function`` and ``site``), plus optional ``reason``, ``host``, ``pid``, ``step``,
``waits_on`` (what the main thread waits on: ``{"kind": "DataLoader", "workers": [pids]}``
or ``{"kind": "thread", "thread": name, "where": {...}}``) and ``flight_recorder`` (the
path of torch's flight recorder dump for this rank).

Example:
    >>> def rec(seq, op, state, site="train.py:80"):
    ...     return {"seq": seq, "op": op, "detail": "[1] float32", "site": site, "state": state}
    >>> waiting = {"rank": 0, "ledger": [rec(811, "all_reduce", "done"),
    ...            rec(812, "all_reduce", "failed")]}
    >>> stuck = {"rank": 1, "ledger": [rec(811, "all_reduce", "done")],
    ...          "where": {"function": "stuck_in_user_code", "site": "train.py:88"}}
    >>> lines = verdict({0: waiting, 1: stuck}, world_size=2).splitlines()
    >>> print(lines[0].split(" (last")[0])
    rank 1 has not entered all_reduce #812; it is in stuck_in_user_code at train.py:88
    >>> print(lines[1])
    rank 0 waited in all_reduce #812 [1] float32 at train.py:80 until it failed
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "DUMP_FORMAT",
    "flight_recorder_lines",
    "mismatches",
    "missing_ranks",
    "read_dumps",
    "verdict",
]

#: The ``format`` field of a dump file.
DUMP_FORMAT = "devlayer-hang-dump/1"

_WAITING = ("running", "failed")


def _last(report: Mapping[str, Any]) -> dict[str, Any] | None:
    """The newest record, passing over a non-blocking vote still in flight (the Trainer
    keeps one running between its checks: the rank is not waiting in it)."""
    ledger = report.get("ledger") or []
    for rec in reversed(ledger):
        if not (rec.get("detail") == "async" and rec.get("state") == "running"):
            return rec
    return ledger[-1] if ledger else None


def _front(reports: Mapping[int, Mapping[str, Any]]) -> dict[str, Any] | None:
    """The collective the waiting ranks are in: the newest running or failed record."""
    best: dict[str, Any] | None = None
    for report in reports.values():
        last = _last(report)
        waiting = last is not None and last.get("state") in _WAITING
        if waiting and (best is None or last["seq"] > best["seq"]):  # type: ignore[index]
            best = last
    return best


def _call(rec: Mapping[str, Any]) -> str:
    detail = f" {rec['detail']}" if rec.get("detail") else ""
    return f"{rec['op']} #{rec['seq']}{detail} at {rec.get('site', '?')}"


def _where(report: Mapping[str, Any]) -> str:
    where = report.get("where") or {}
    if not where:
        return "where it is is not known (no stack in its report)"
    at = f"it is in {where.get('function', '?')} at {where.get('site', '?')}"
    return at + _waiting(report.get("waits_on") or {})


def _waiting(waits: Mapping[str, Any]) -> str:
    """``, waiting on ...`` for what the main thread waits on (a DataLoader, a thread)."""
    if waits.get("kind") == "DataLoader":
        pids = ", ".join(map(str, waits.get("workers") or ())) or "not known"
        return f", waiting on a DataLoader (worker pids: {pids})"
    if waits.get("kind") == "thread":
        inner = waits.get("where") or {}
        site = f"{inner.get('function', '?')} at {inner.get('site', '?')}"
        return f", waiting for thread {waits.get('thread', '?')} (in {site})"
    return ""


def _rank_line(rank: int, report: Mapping[str, Any], front: Mapping[str, Any] | None) -> str:
    last = _last(report)
    if front is None:
        if last is None:
            return f"rank {rank} ran no collective yet; {_where(report)}"
        return f"rank {rank}: last collective {_call(last)} ({last['state']}); {_where(report)}"
    if last is None or last["seq"] < front["seq"]:
        before = f" (last collective: {_call(last)}, {last['state']})" if last else ""
        return (
            f"rank {rank} has not entered {front['op']} #{front['seq']}; {_where(report)}{before}"
        )
    if last["seq"] == front["seq"] and last.get("state") in _WAITING:
        if last["state"] == "failed":
            return f"rank {rank} waited in {_call(last)} until it failed"
        return f"rank {rank} waits in {_call(last)}"
    return f"rank {rank} is at {_call(last)} ({last['state']}); {_where(report)}"


def mismatches(reports: Mapping[int, Mapping[str, Any]]) -> list[str]:
    """Lines naming sequence numbers where ranks called different collectives.

    The operation must match, and for ``all_reduce`` and ``broadcast`` the signature too
    (``all_gather`` may differ in dim 0 by design).
    """
    by_seq: dict[int, dict[int, Mapping[str, Any]]] = {}
    for rank, report in reports.items():
        for rec in report.get("ledger") or []:
            by_seq.setdefault(rec["seq"], {})[rank] = rec
    lines = []
    for seq in sorted(by_seq):
        recs = by_seq[seq]
        ops = {rec["op"] for rec in recs.values()}
        details = {rec.get("detail") for rec in recs.values()}
        same_detail = len(details) == 1 or not ops & {"all_reduce", "broadcast"}
        if len(recs) > 1 and (len(ops) > 1 or not same_detail):
            calls = "; ".join(f"rank {r} {_call(recs[r])}" for r in sorted(recs))
            lines.append(f"ranks called different collectives at #{seq}: {calls}")
    return lines


def missing_ranks(reports: Mapping[int, Any], world_size: int) -> list[int]:
    """The ranks of ``range(world_size)`` that left no report."""
    return [r for r in range(world_size) if r not in reports]


def verdict(
    reports: Mapping[int, Mapping[str, Any]],
    world_size: int,
    exits: Mapping[int, str] | None = None,
) -> str:
    """A short report: the ranks that are elsewhere first, then the waiting ones, then
    different collectives at one sequence number, then the ranks that left nothing.

    Args:
        reports: Rank -> its report (a dump or a posted position).
        world_size: The job's ranks, to name the ones with no report.
        exits: Rank -> how it ended (``"was killed by SIGKILL"``), where the launcher
            knows it, for the ranks with no report.
    """
    front = _front(reports)
    lines = [_rank_line(r, reports[r], front) for r in sorted(reports)]
    lines.sort(key=lambda line: " waits in " in line or " waited in " in line)
    lines += mismatches(reports)
    gone = missing_ranks(reports, world_size)
    if gone:
        known = [f"rank {r} {exits[r]}" for r in gone if exits and r in exits]
        lines.append(
            f"rank(s) {', '.join(map(str, gone))} left no report (no dump, no answer): "
            + ("; ".join(known) if len(known) == len(gone) else "exited or killed")
        )
    lines += flight_recorder_lines(reports)
    return "\n".join(lines)


def flight_recorder_lines(reports: Mapping[int, Mapping[str, Any]]) -> list[str]:
    """One line naming the dump files of torch's flight recorder the ranks' reports name
    (written by torch when its own timeout fires; ``torchfrtrace`` reads them)."""
    files = {r: rep["flight_recorder"] for r, rep in reports.items() if rep.get("flight_recorder")}
    if not files:
        return []
    comm = next(iter(reports[r].get("comm") or "?" for r in sorted(files)))
    named = "; ".join(f"rank {r}: {files[r]}" for r in sorted(files))
    prefix = os.path.basename(files[min(files)]).rstrip("0123456789")
    return [
        f"torch's flight recorder ({comm}): {named} (written by torch on its own timeout; "
        f"read them with: torchfrtrace {os.path.dirname(files[min(files)])} -p {prefix})"
    ]


def read_dumps(folder: str | os.PathLike[str]) -> tuple[dict[int, dict[str, Any]], list[str]]:
    """The dumps in ``folder`` (``rank<N>.json``) and a note per file that is not one.

    Returns:
        ``(rank -> report, problems)``; a file that is not JSON or not a devlayer dump is
        named in ``problems`` and skipped.
    """
    reports: dict[int, dict[str, Any]] = {}
    problems: list[str] = []
    for path in sorted(Path(folder).glob("rank*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            problems.append(f"{path.name}: not readable as JSON ({exc})")
            continue
        if not isinstance(doc, dict) or doc.get("format") != DUMP_FORMAT:
            problems.append(f"{path.name}: not a devlayer hang dump ({DUMP_FORMAT})")
            continue
        reports[int(doc.get("rank", -1))] = doc
    return reports, problems
