"""``devlayer farm``: a queue of one-device jobs spread over the visible devices.

devlayer farm --devices 0,1 --count 8 -- python job.py --trial {}
devlayer farm --jobs params.txt -- python job.py {}      # one job per line ({} = line)

Jobs are argv lists, never run through a shell. A job line is split into words as a shell
would split it (``shlex.split``, so quotes group words); an argument that is exactly ``{}``
becomes those words. A ``{}`` inside a larger argument (``sh -c "python job.py {}"``) gets
the words quoted for a shell (``shlex.join``), so a line such as ``x; rm -rf ~`` stays data.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from devlayer.errors import InvalidArgumentError

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``devlayer farm`` options."""
    parser.add_argument("--devices", default=None, help="devices to use (default: all visible)")
    parser.add_argument("--backend", default=None, help="backend whose devices to use")
    parser.add_argument(
        "--parallel",
        type=int,
        default=None,
        help="jobs at once (default: one per device; CPU: one per core)",
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--jobs",
        help="file with one job per line ('-' = stdin); the line's words (split like a "
        "shell, never run by one) replace an argument {} (or are appended); a {} inside an "
        "argument gets them quoted for a shell",
    )
    group.add_argument("--count", type=int, help="run N jobs; {} becomes 0..N-1")
    parser.add_argument("job", nargs=argparse.REMAINDER, help="-- then the job command")


def _commands(args: argparse.Namespace) -> list[list[str]]:
    template = list(args.job)
    if template and template[0] == "--":
        template = template[1:]
    if not template:
        raise InvalidArgumentError("devlayer farm needs a command after --")
    if args.count is not None:
        if args.count < 1:
            raise InvalidArgumentError(f"--count={args.count} must be >= 1")
        items = [[str(i)] for i in range(args.count)]
    else:
        handle = sys.stdin if args.jobs == "-" else open(args.jobs)  # noqa: SIM115
        with handle:
            items = [shlex.split(line) for line in handle if line.strip()]
    out = []
    for item in items:
        if any("{}" in part for part in template):
            argv: list[str] = []
            for part in template:
                if part == "{}":
                    argv.extend(item)
                else:  # inside a larger argument, e.g. `sh -c "python job.py {}"`
                    argv.append(part.replace("{}", shlex.join(item)))
            out.append(argv)
        else:
            out.append([*template, *item])
    return out


def run(args: argparse.Namespace) -> int:
    """Run the farm; print a summary; exit 0 only if every job succeeded."""
    from devlayer.farm import farm

    commands = _commands(args)
    results = farm(commands, backend=args.backend, devices=args.devices, parallel=args.parallel)
    failed = [r for r in results if r.returncode != 0]
    print(f"\ndevlayer farm: {len(results) - len(failed)}/{len(results)} jobs succeeded")
    print(f"{'job':>4}  {'slot':<10} {'exit':>5} {'seconds':>8}  command")
    for r in results:
        print(
            f"{r.index:>4}  {r.slot:<10} {r.returncode:>5} {r.seconds:>8.2f}  "
            f"{shlex.join(r.command)}"
        )
    return 0 if not failed else 1
