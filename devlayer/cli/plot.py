"""``devlayer plot METRICS.jsonl``: training curves and throughput from a Trainer's metrics file.

The file is what ``Trainer(metrics_file=...)`` writes: one JSON object per epoch with
``epoch``, ``train_loss``, the ``val_*`` metrics, ``samples_per_sec`` and more. The plot has
up to three panels side by side: the losses (train and validation), the other validation
metrics (accuracy, ...), and samples/s per epoch. A resumed run appends to the same file;
when an epoch appears twice, the later line wins. A resume at another world size writes an
event line (``"event": "world_size_change"``); the plot marks it on every panel with a
dashed line labelled with the old and new world sizes and the step.

matplotlib is an optional dependency (``pip install 'devlayer[plot]'``).

Example:
    >>> import json, tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> lines = [{"epoch": e, "train_loss": 1 / e, "samples_per_sec": 100.0} for e in (1, 2)]
    >>> _ = (folder / "m.jsonl").write_text("\\n".join(json.dumps(x) for x in lines))
    >>> sorted(read_metrics(folder / "m.jsonl")[1])
    ['epoch', 'samples_per_sec', 'train_loss']
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from devlayer.errors import InvalidArgumentError

__all__ = [
    "add_arguments",
    "plot_metrics",
    "read_events",
    "read_metrics",
    "run",
    "world_size_marks",
]

_MAX_BYTES = 64 * 2**20  # a metrics file has one short line per epoch
_LOSSES = ("train_loss", "val_loss")
#: Bookkeeping fields of a metrics line, not curves (``batches*``: a partial epoch's position).
_NOT_METRICS = {
    "epoch",
    "global_step",
    "world_size",
    "epoch_time",
    "lr",
    "partial",
    "batches",
    "batches_per_epoch",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``devlayer plot`` arguments."""
    parser.add_argument("metrics", help="a metrics file written by Trainer(metrics_file=...)")
    parser.add_argument(
        "-o", "--output", default=None, help="PNG to write (default: METRICS with .png)"
    )
    parser.add_argument(
        "--size",
        default="1500x450",
        help="image size in pixels, WIDTHxHEIGHT (default 1500x450)",
    )
    parser.add_argument("--title", default=None, help="figure title (default: the file name)")


def _records(path: str | os.PathLike[str]) -> Iterator[tuple[Path, int, str, Any]]:
    """``(file, line number, line, parsed JSON)`` of each non-empty line of ``path``."""
    file = Path(path)
    if not file.is_file():
        raise InvalidArgumentError(
            f"{file}: no such metrics file (Trainer(metrics_file=...) writes one)"
        )
    if file.stat().st_size > _MAX_BYTES:
        raise InvalidArgumentError(f"{file}: {file.stat().st_size} bytes is not a metrics file")
    with file.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidArgumentError(f"{file}:{number}: not JSON ({exc.msg})") from None
            yield file, number, line, record


def read_events(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The event lines of a metrics file (``{"event": "world_size_change", ...}``), in order.

    Example:
        >>> import json, tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "m.jsonl"
        >>> _ = f.write_text(json.dumps({"event": "world_size_change", "epoch": 0}))
        >>> [e["event"] for e in read_events(f)]
        ['world_size_change']
    """
    return [
        record
        for _, _, _, record in _records(path)
        if isinstance(record, dict) and isinstance(record.get("event"), str)
    ]


def read_metrics(path: str | os.PathLike[str]) -> dict[int, dict[str, float]]:
    """Epoch -> numeric metrics of that epoch (the last line for an epoch wins; event
    lines, see :func:`read_events`, are not epochs).

    Raises:
        InvalidArgumentError: The file is missing, not a regular file, too large, empty,
            or a line is not a JSON object with an integer ``epoch``; the message names the
            line.
    """
    epochs: dict[int, dict[str, float]] = {}
    file = Path(path)
    for file, number, line, record in _records(path):
        if isinstance(record, dict) and "event" in record:
            continue
        epoch = record.get("epoch") if isinstance(record, dict) else None
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            raise InvalidArgumentError(
                f"{file}:{number}: expected a JSON object with an integer 'epoch', "
                f"got {line.strip()[:80]!r}"
            )
        epochs[epoch] = {
            k: float(v)
            for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }
    if not epochs:
        raise InvalidArgumentError(f"{file}: no epochs recorded yet")
    return dict(sorted(epochs.items()))


def _series(epochs: Mapping[int, Mapping[str, float]]) -> dict[str, list[tuple[int, float]]]:
    names: list[str] = []
    for values in epochs.values():
        names += [k for k in values if k not in names and k not in _NOT_METRICS]
    return {n: [(e, v[n]) for e, v in epochs.items() if n in v] for n in names}


def plot_metrics(
    epochs: Mapping[int, Mapping[str, float]],
    output: str | os.PathLike[str],
    *,
    size: tuple[int, int] = (1500, 450),
    title: str | None = None,
    events: Sequence[Mapping[str, Any]] = (),
) -> dict[str, list[tuple[int, float]]]:
    """Draw the curves into the PNG ``output``; return the series drawn, by name.

    ``events`` (from :func:`read_events`): each world-size change is a dashed vertical line
    between the last epoch before it and the first after it, labelled ``world 2->1 @ step
    24``.

    Raises:
        InvalidArgumentError: matplotlib is not installed (with the install line).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never open a window
        import matplotlib.pyplot as plt
    except ImportError:
        raise InvalidArgumentError(
            "devlayer plot needs matplotlib: pip install 'devlayer[plot]' (or matplotlib)"
        ) from None
    series = _series(epochs)
    losses = {n: s for n, s in series.items() if n in _LOSSES}
    throughput = {n: s for n, s in series.items() if n == "samples_per_sec"}
    others = {n: s for n, s in series.items() if n not in losses and n not in throughput}
    panels = [(t, p) for t, p in (("loss", losses), ("metrics", others)) if p]
    if throughput:
        panels.append(("samples/s", throughput))
    dpi = 100
    fig, axes = plt.subplots(
        1, max(len(panels), 1), figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, squeeze=False
    )
    for ax, (label, group) in zip(axes[0], panels, strict=False):
        for name, points in group.items():
            xs, ys = zip(*points, strict=True)
            if label == "samples/s":
                ax.bar(xs, ys, color="tab:gray", label=name)
            else:
                ax.plot(xs, ys, marker="o", markersize=3, label=name)
        values = [v for points in group.values() for _, v in points]
        if label != "samples/s" and min(values) > 0 and max(values) > 50 * min(values):
            ax.set_yscale("log")  # an early validation loss can dwarf the rest of the run
        _mark_events(ax, events)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(output, dpi=dpi)
    plt.close(fig)
    return series


def world_size_marks(events: Sequence[Mapping[str, Any]]) -> list[tuple[float, str]]:
    """``(x, label)`` of each world-size change: x sits inside the epoch it happened in
    (epoch lines are drawn at their 1-based number, the change has the 0-based one).

    Example:
        >>> world_size_marks([{"event": "world_size_change", "epoch": 1, "global_step": 24,
        ...                    "old_world_size": 2, "new_world_size": 1}])
        [(1.5, 'world 2->1 @ step 24')]
    """
    marks = []
    for event in events:
        if event.get("event") != "world_size_change" or not isinstance(event.get("epoch"), int):
            continue
        label = (
            f"world {event.get('old_world_size')}->{event.get('new_world_size')} @ step "
            f"{event.get('global_step')}"
        )
        marks.append((event["epoch"] + 0.5, label))
    return marks


def _mark_events(ax: Any, events: Sequence[Mapping[str, Any]]) -> None:
    for x, label in world_size_marks(events):
        ax.axvline(x, color="tab:red", linestyle="--", linewidth=1, label=label)


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InvalidArgumentError(
            f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 1500x450"
        ) from None
    if not (100 <= width <= 10000 and 100 <= height <= 10000):
        raise InvalidArgumentError(f"--size {text!r}: each side must be 100..10000 pixels")
    return width, height


def run(args: argparse.Namespace) -> int:
    """Read the metrics file, write the PNG, print what was drawn."""
    size = _size(args.size)
    epochs = read_metrics(args.metrics)
    output = Path(args.output or Path(args.metrics).with_suffix(".png"))
    events = read_events(args.metrics)
    title = args.title or Path(args.metrics).name
    series = plot_metrics(epochs, output, size=size, title=title, events=events)
    marks = world_size_marks(events)
    changes = f"; marked {', '.join(label for _, label in marks)}" if marks else ""
    print(
        f"devlayer plot: {output} ({size[0]}x{size[1]}): {len(epochs)} epoch(s); "
        f"series {', '.join(series)}{changes}",
        file=sys.stdout,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m devlayer.cli.plot``: the same as ``devlayer plot``."""
    parser = argparse.ArgumentParser(prog="devlayer plot")
    add_arguments(parser)
    return run(parser.parse_args(argv))
