"""The ``devlayer`` command line (also ``python -m devlayer``).

Subcommands:
    info    What devlayer sees here: versions, backends, devices, launcher, pitfalls.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from devlayer import __version__

    parser = argparse.ArgumentParser(
        prog="devlayer",
        description="A vendor-agnostic device layer for PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"devlayer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="show backends, devices, launcher and known pitfalls")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``devlayer`` console script. Returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        from devlayer.cli.info import run

        return run(as_json=args.json)
    parser.print_help(sys.stderr)
    return 2
