"""Preemption for the Trainer: SIGTERM becomes a stop that every rank takes at one step.

A scheduler (SLURM, Kubernetes, a spot reclaim) sends SIGTERM to some ranks, at different
moments. :class:`Preemption` turns the signal into a flag; every ``check_every`` optimizer
steps the ranks vote (:func:`devlayer.comm.vote_any`, non-blocking: each check reads the
vote started at the previous one), so all ranks stop at the same step, save a checkpoint
and raise :class:`~devlayer.train.errors.PreemptedError`.

Example:
    >>> p = Preemption(check_every=10)
    >>> (p.signal, p.error(step=3, epoch=0, checkpoint_dir=None).args[0][:30])
    (None, 'training stopped at step 3 (ep')
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from devlayer.train.errors import PreemptedError
from devlayer.train.signals import on_sigterm

__all__ = ["Preemption"]


class Preemption:
    """The termination flag of one ``fit()`` and the ranks' agreement on it.

    Args:
        check_every: Vote every N optimizer steps; all ranks stop within two multiples of
            N steps after the first signal.
    """

    def __init__(self, check_every: int) -> None:
        self.check_every = check_every
        #: The signal number received by this rank (``None``: none yet).
        self.signal: int | None = None
        self._vote: Any = None  # the vote started at the previous check

    @contextlib.contextmanager
    def catch(self) -> Iterator[None]:
        """Within the block, SIGTERM sets :attr:`signal` instead of ending the process."""

        def on_signal(signum: int, frame: Any) -> None:
            self.signal = signum

        with on_sigterm(on_signal):
            yield

    def should_stop(self, step: int, world_size: int) -> bool:
        """At a check step, True on every rank once any rank was signalled (collective).

        Args:
            step: The optimizer step just taken (checks happen at multiples of
                ``check_every``, so all ranks vote at the same steps).
            world_size: The number of ranks (1: no vote, the local flag decides).
        """
        if step % self.check_every:
            return False
        local = self.signal is not None
        if world_size == 1:
            return local
        from devlayer.comm import vote_any

        agreed = self.settle()
        if not agreed:
            self._vote = vote_any(local)
        return agreed

    def settle(self) -> bool:
        """Wait for the vote in flight, if any; True when some rank asked to stop.

        ``fit()`` calls it before returning, so no collective is left in flight.
        """
        vote, self._vote = self._vote, None
        return vote.result() if vote is not None else False

    def error(self, *, step: int, epoch: int, checkpoint_dir: Path | None) -> PreemptedError:
        """The error ``fit()`` raises after the agreed stop (and its checkpoint)."""
        where = (
            f"; checkpoint saved in {checkpoint_dir} (resume='auto' continues)"
            if checkpoint_dir is not None
            else "; no checkpoint_dir, so progress since the start is lost"
        )
        name = signal.Signals(self.signal).name if self.signal else "SIGTERM"
        return PreemptedError(
            f"training stopped at step {step} (epoch {epoch + 1}) because rank(s) received "
            f"signal {name}{where}"
        )
