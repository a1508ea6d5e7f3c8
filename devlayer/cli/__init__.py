"""The ``devlayer`` command line (also ``python -m devlayer``).

Subcommands:
    info    What devlayer sees here: versions, backends, devices, launcher, pitfalls.
    doctor  info, plus a timed multi-rank smoke test under a launcher, with a diagnosis.
    bench   a collective size sweep (time, algbw, busbw), like nccl-tests.
    farm    a queue of independent one-device jobs over the visible devices.
    launch  torchrun with devlayer's defaults: one process per device, loopback rendezvous
            on a free port, the failing rank's exit code.
    plot    training curves and throughput from a Trainer metrics file, as one PNG.
    hangs   one verdict from the hang dumps of a job: which rank is where, who diverged.
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
    doctor = sub.add_parser("doctor", help="info plus a multi-rank smoke test and diagnosis")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds for each step (rendezvous, barrier, ...)",
    )
    from devlayer.cli import bench, farm, hangs, launch, plot

    farm.add_arguments(sub.add_parser("farm", help="run many one-device jobs, one per device"))

    bench.add_arguments(sub.add_parser("bench", help="time a collective over message sizes"))

    launch.add_arguments(
        sub.add_parser("launch", help="start a script on N local ranks (torchrun underneath)")
    )
    plot.add_arguments(
        sub.add_parser("plot", help="training curves from a metrics file, as one PNG")
    )
    hangs.add_arguments(
        sub.add_parser("hangs", help="which rank is where, from a folder of hang dumps")
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``devlayer`` console script. Returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    from devlayer.errors import DevlayerError

    try:
        if args.command == "info":
            from devlayer.cli.info import run

            return run(as_json=args.json)
        if args.command == "doctor":
            from devlayer.cli.doctor import run as doctor

            return doctor(as_json=args.json, timeout=args.timeout)
        if args.command == "bench":
            from devlayer.cli.bench import run as bench_run

            return bench_run(args)
        if args.command == "farm":
            from devlayer.cli.farm import run as farm_run

            return farm_run(args)
        if args.command == "launch":
            from devlayer.cli.launch import run as launch

            return launch(args)
        if args.command == "plot":
            from devlayer.cli.plot import run as plot_run

            return plot_run(args)
        if args.command == "hangs":
            from devlayer.cli.hangs import run as hangs_run

            return hangs_run(args)
    except DevlayerError as exc:
        print(f"devlayer {args.command}: error: {exc}", file=sys.stderr)
        return 2
    parser.print_help(sys.stderr)
    return 2
