"""MkDocs hooks for devlayer's documentation site (``hooks:`` in mkdocs.yml).

* Links from docs/ to files elsewhere in the repository (``../examples/sin_fit.py``,
  ``../CHANGELOG.md``) work when the pages are read on GitHub but have no page on the site.
  Each is checked to exist (a missing one is a warning, so ``mkdocs build --strict`` fails)
  and is shown as its text.
* ``<!-- devlayer-cli-help -->`` in a page becomes the ``--help`` text of the ``devlayer``
  command and of each of its subcommands, so the command-line reference cannot fall behind.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.hooks.devlayer")

ROOT = Path(__file__).resolve().parent.parent
CLI_MARKER = "<!-- devlayer-cli-help -->"
LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def _outside_target(page_file: Path, target: str, docs_dir: Path) -> Path | None:
    """The repository file a relative link names when it lies outside ``docs_dir``."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith(("#", "/")):
        return None
    path = (page_file.parent / target.split("#")[0]).resolve()
    if path == docs_dir or docs_dir in path.parents:
        return None
    return path


def _rewrite_line(line: str, page_file: Path, docs_dir: Path, where: str) -> str:
    """``line`` with each link to a file outside docs/ replaced by its text (checked first)."""

    def replace(match: re.Match[str]) -> str:
        path = _outside_target(page_file, match.group(3), docs_dir)
        if path is None:
            return match.group(0)
        if ROOT not in path.parents or not path.exists():
            log.warning("%s links to %s, which does not exist", where, match.group(3))
        return match.group(2)

    return LINK.sub(replace, line)


def _help(*command: str) -> str:
    """``devlayer <command> --help`` as this checkout prints it, 100 columns wide."""
    env = {**os.environ, "COLUMNS": "100"}
    proc = subprocess.run(
        [sys.executable, "-m", "devlayer", *command, "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        log.warning("devlayer %s --help failed: %s", " ".join(command), proc.stderr.strip())
    return proc.stdout.rstrip()


def _cli_reference() -> str:
    """The help of ``devlayer`` and of every subcommand its own help lists."""
    top = _help()
    listed = top.split("COMMAND\n", 2)[-1].split("\n\n")[0]
    commands = re.findall(r"^    (\w+) ", listed, flags=re.MULTILINE)
    if not commands:
        log.warning("found no subcommand in `devlayer --help`")
    parts = [f"```text\n$ devlayer --help\n{top}\n```"]
    for name in commands:
        parts.append(f"### `devlayer {name}`\n\n```text\n{_help(name)}\n```")
    return "\n\n".join(parts)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Check and unlink links that leave docs/; expand the CLI marker."""
    # Links are read as they are on GitHub: from the page's place in the repository's docs/
    # (also when a test builds a copy of docs/ elsewhere).
    docs_dir = ROOT / "docs"
    page_file = docs_dir / page.file.src_path
    out, fenced = [], False
    for number, line in enumerate(markdown.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            line = _rewrite_line(line, page_file, docs_dir, f"{page.file.src_path}:{number}")
        out.append(line)
    text = "\n".join(out) + "\n"
    if CLI_MARKER in text:
        text = text.replace(CLI_MARKER, _cli_reference())
    return text
