"""Progress output for the Trainer: a tqdm bar on a terminal, plain lines in a job log.

A SLURM ``%x-%j.out`` file is not a terminal: tqdm's carriage-return frames pile up in it.
:func:`progress_bar` picks tqdm for a terminal (or a Jupyter kernel) and
:class:`LineProgress` otherwise: one line every ``DEVLAYER_PROGRESS_INTERVAL`` seconds.

Example:
    >>> import io
    >>> bar = progress_bar(total=4, initial=0, desc="epoch 1", interval=0,
    ...                    stream=io.StringIO(), step=lambda: "step 1")
    >>> type(bar).__name__
    'LineProgress'
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from devlayer.config import Settings

__all__ = [
    "LineProgress",
    "RateLog",
    "epoch_progress",
    "is_terminal",
    "progress_bar",
    "resolve_progress_interval",
]


def resolve_progress_interval(
    interval: float | None, env: Mapping[str, str] | None = None
) -> float:
    """Seconds between plain progress lines: ``interval``, else the setting
    (:attr:`devlayer.config.Settings.progress_interval`, ``DEVLAYER_PROGRESS_INTERVAL``).

    Args:
        interval: The Trainer's ``progress_interval`` argument; ``None``: the setting.
        env: The environment the setting is read from; default ``os.environ``.

    Raises:
        InvalidArgumentError: Not a number of seconds >= 0, naming the argument or the
            variable.

    Example:
        >>> resolve_progress_interval(None, {})
        30.0
        >>> resolve_progress_interval(None, {"DEVLAYER_PROGRESS_INTERVAL": "5"})
        5.0
        >>> resolve_progress_interval(0, {"DEVLAYER_PROGRESS_INTERVAL": "5"})
        0.0
    """
    if interval is not None:  # the argument wins; a bad variable beside it does not matter
        return float(Settings().given("progress_interval", interval).progress_interval)
    settings = Settings.from_env(os.environ if env is None else env, ("progress_interval",))
    return float(settings.progress_interval)


class LineProgress:
    """tqdm's ``update`` / ``set_postfix`` / ``close`` as plain lines for job logs.

    A SLURM ``%x-%j.out`` file is not a terminal: tqdm's carriage-return frames pile up in
    it. This prints one line per ``interval`` seconds instead (checked at each update, so
    it never wakes up on its own), with no carriage return.
    """

    def __init__(
        self,
        *,
        total: int,
        initial: int,
        desc: str,
        interval: float,
        stream: Any,
        step: Callable[[], str],
    ) -> None:
        self.total, self.n, self.desc = total, initial, desc
        self.interval, self.stream, self.step = interval, stream, step
        self.postfix: dict[str, Any] = {}
        self.started = self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._emit(now)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def close(self) -> None:
        """Nothing to clear: the epoch summary line follows."""

    def _emit(self, now: float) -> None:
        parts = [self.desc, f"batch {self.n}/{self.total}", self.step()]
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        parts.append(f"{now - self.started:.0f}s")
        print(" | ".join(parts), file=self.stream, flush=True)


def is_terminal(stream: Any) -> bool:
    """A terminal, or a Jupyter kernel's stream (where tqdm.auto draws a widget)."""
    if type(stream).__module__.startswith("ipykernel"):
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(
    *,
    total: int,
    initial: int,
    desc: str,
    interval: float,
    stream: Any,
    step: Callable[[], str],
) -> Any:
    """A tqdm bar on a terminal; a :class:`LineProgress` (no carriage returns) elsewhere.

    Args:
        total: Micro-batches in the epoch.
        initial: Micro-batches already done (a resumed epoch).
        desc: The bar's label, e.g. ``"epoch 2/10"``.
        interval: Seconds between plain lines (``LineProgress`` only).
        stream: Where to write (``sys.stderr``).
        step: Returns the optimizer-step text that plain lines end with.
    """
    if is_terminal(stream):
        from tqdm.auto import tqdm

        return tqdm(
            total=total,
            initial=initial,
            leave=False,
            desc=desc,
            mininterval=1.0,
            dynamic_ncols=True,
            file=stream,
        )
    return LineProgress(
        total=total, initial=initial, desc=desc, interval=interval, stream=stream, step=step
    )


class RateLog:
    """Samples/s over all ranks since the previous progress postfix.

    Args:
        step: The optimizer step at the start.
        now: ``time.perf_counter()`` at the start.
        world_size: Ranks that each process as many samples as this one.

    Example:
        >>> log = RateLog(0, time.perf_counter() - 2.0, world_size=2)
        >>> int(log.text(step=5, samples=100)) in range(90, 101)
        True
        >>> log.step
        5
    """

    def __init__(self, step: int, now: float, *, world_size: int) -> None:
        self.step, self.time, self.samples = step, now, 0
        self.world_size = world_size

    def text(self, *, step: int, samples: int) -> str:
        """The rate since the last call (or the start) at ``step``, ``samples`` seen."""
        now = time.perf_counter()
        rate = (samples - self.samples) * self.world_size / max(now - self.time, 1e-9)
        self.step, self.time, self.samples = step, now, samples
        return f"{rate:.0f}"


def epoch_progress(total: int, state: Any, bounds: Any, interval: float) -> Any:
    """The Trainer's bar of one epoch on stderr (:func:`progress_bar`).

    Args:
        total: Micro-batches in the epoch.
        state: The run's :class:`~devlayer.train.history.TrainingState` (where it starts,
            and the step count that plain lines show).
        bounds: The run's :class:`~devlayer.train.bounds.Bounds` (the epoch and step texts).
        interval: Seconds between plain lines in a job log.
    """
    return progress_bar(
        total=total,
        initial=state.batches_done,
        desc=bounds.epoch_text(state.epoch),
        interval=interval,
        stream=sys.stderr,
        step=lambda: bounds.step_text(state.global_step),
    )
