"""``devlayer hangs DIR``: one verdict from the hang dumps the ranks of a job left in DIR.

Which rank is where ("rank 1 has not entered all_reduce #812; it is in stuck_in_user_code
at train.py:88"), which ranks called different collectives at one sequence number, and
which ranks left no dump (:func:`devlayer.hangreport.verdict`). Reads JSON only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from devlayer.errors import InvalidArgumentError
from devlayer.hangreport import read_dumps, verdict

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``devlayer hangs`` options."""
    parser.add_argument("dir", help="the folder the ranks wrote rank<N>.json into")
    parser.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="ranks in the job, to name those that left no dump (default: from the dumps)",
    )


def run(args: argparse.Namespace) -> int:
    """Print the verdict; 0 when the folder held dumps.

    Raises:
        InvalidArgumentError: The folder does not exist or holds no dump.
    """
    folder = Path(args.dir)
    if not folder.is_dir():
        raise InvalidArgumentError(
            f"{folder} is not a folder; pass the hang dump folder the error message or "
            f"DEVLAYER_HANG_DIR names"
        )
    reports, problems = read_dumps(folder)
    for problem in problems:
        print(f"devlayer hangs: skipped {problem}", file=sys.stderr)
    if not reports:
        raise InvalidArgumentError(
            f"{folder} holds no hang dump (rank<N>.json); a job with no hang writes none"
        )
    world = args.world_size or max(int(r.get("world_size", 0)) for r in reports.values())
    print(f"hang report from {len(reports)} dump(s) in {folder} (world size {world}):")
    print(verdict(reports, max(world, max(reports) + 1)))
    return 0
