"""Reporting helpers the benchmark scripts share (tables, versions, the code under test).

The scripts run as files under ``torchrun`` as well as modules; each puts the repository
root on ``sys.path`` before importing this module.
"""

from __future__ import annotations

import importlib.metadata
import os
import statistics
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def med_range(values: list[float], fmt: str = "{:.1f}") -> str:
    """``median [min, max]``."""
    return (
        f"{fmt.format(statistics.median(values))} "
        f"[{fmt.format(min(values))}, {fmt.format(max(values))}]"
    )


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def versions(dists: tuple[str, ...]) -> dict[str, str | None]:
    """Installed version of each distribution (package metadata, imports nothing), or None."""
    out: dict[str, str | None] = {}
    for name in dists:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_state() -> str:
    """Commit of the checkout under test, with "+dirty" when devlayer/ or backends/ changed."""
    try:
        head = subprocess.run(
            ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", ROOT, "status", "--porcelain", "--", "devlayer", "backends"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")
