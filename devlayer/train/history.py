"""Where a Trainer's run is and what it recorded: position, running sums, history, report.

:class:`TrainingState` (``trainer.state``) is the position (epoch, micro-batches of the
epoch in progress, optimizer steps) and the history, one entry per epoch; checkpoints save
and restore it. :class:`EpochSums` are this rank's running loss sum and sample count of the
epoch in progress, which a checkpoint inside an epoch keeps so that a resumed epoch reports
the same loss. :func:`report_epoch` writes an entry to the metrics file and the log.

Example:
    >>> state = TrainingState(epoch=2, global_step=8, history=[{"epoch": 2, "partial": True}])
    >>> state.continue_history(); state.history
    []
    >>> state.position()
    {'epoch': 2, 'batches_done': 0, 'global_step': 8, 'history': []}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import devlayer
from devlayer.train.metrics import epoch_line, epoch_metrics

if TYPE_CHECKING:
    from devlayer.train.loggers import Loggers

__all__ = ["EpochSums", "TrainingState", "report_epoch"]


@dataclass
class TrainingState:
    """The run's position and history (``trainer.state``).

    Attributes:
        epoch: Completed epochs (the epoch in progress, 0-based).
        batches_done: Micro-batches consumed in the epoch in progress.
        global_step: Optimizer steps taken.
        history: One dict of averaged metrics per epoch (a partial one when ``max_steps``
            or a preemption stopped inside an epoch).
    """

    epoch: int = 0
    batches_done: int = 0
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def position(self) -> dict[str, Any]:
        """The checkpoint payload's entries for the position and the history."""
        return {
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "global_step": self.global_step,
            "history": self.history,
        }

    def restore(self, payload: Mapping[str, Any], *, same_world: bool) -> None:
        """Take a checkpoint's position and history. At another world size the data is
        sharded differently: the interrupted epoch restarts from its beginning."""
        self.history = list(payload.get("history", []))
        self.epoch = int(payload["epoch"])
        self.batches_done = int(payload["batches_done"]) if same_world else 0
        self.global_step = int(payload["global_step"])

    def continue_history(self) -> None:
        """Training goes on from a checkpoint: its last entry no longer ends the run.

        A partial epoch (``max_steps`` stopped inside it) is dropped: this run trains the
        rest of that epoch and records it whole, resumed loss sums included.
        """
        history = self.history
        if history and history[-1].get("partial"):
            history.pop()
        elif history:
            history[-1] = {k: v for k, v in history[-1].items() if k != "stopped_by"}

    def record_epoch(
        self,
        sums: Mapping[str, Any],
        completed: bool,
        n_batches: int,
        lr: float,
        reference_throughput: float | None,
    ) -> dict[str, Any]:
        """Append the epoch's entry, made from its ``sums`` over all ranks, and return it.

        Args:
            sums: The epoch's sums over all ranks (:func:`~devlayer.train.metrics.epoch_metrics`).
            completed: Whether the epoch ran to its end; a partial epoch's entry says so,
                with the micro-batches it ran of ``n_batches``.
            n_batches: The epoch's micro-batches.
            lr: The first param group's learning rate.
            reference_throughput: World-size-1 samples/s, or ``None``.
        """
        metrics = epoch_metrics(
            sums,
            epoch=self.epoch + 1,
            global_step=self.global_step,
            world_size=devlayer.world_size(),
            lr=lr,
            reference_throughput=reference_throughput,
        )
        if not completed:
            metrics["partial"] = True
            metrics["batches"] = self.batches_done
            metrics["batches_per_epoch"] = n_batches
        self.history.append(metrics)
        return metrics


@dataclass
class EpochSums:
    """This rank's running loss sum (a device tensor) and samples of the epoch in progress.

    Attributes:
        loss: The batch-size weighted loss sum, ``None`` outside an epoch.
        samples: The samples it sums.
        resumed: The sums a checkpoint inside an epoch held, for that epoch's resumption.
    """

    loss: Any = None
    samples: int = 0
    resumed: tuple[float, int] = (0.0, 0)

    def start(self, *, resuming: bool, device: Any) -> Any:
        """Begin an epoch (from the resumed sums when it resumes inside); returns the sum,
        a :func:`~devlayer.torchcompat.float_dtype` tensor on ``device``."""
        import torch

        from devlayer.torchcompat import float_dtype

        loss, self.samples = self.resumed if resuming else (0.0, 0)
        self.resumed = (0.0, 0)
        self.loss = torch.full((), loss, device=device, dtype=float_dtype(device))
        return self.loss

    def add(self, loss: Any, size: int) -> None:
        """Add one micro-batch's loss, weighted by its ``size``."""
        self.loss.add_(loss.detach(), alpha=size)  # promotes into the float64 sum
        self.samples += size

    def clear(self) -> None:
        """The epoch is complete: nothing runs on."""
        self.loss, self.samples = None, 0

    def mine(self) -> dict[str, Any]:
        """This rank's entry in a checkpoint (a device sync when an epoch is in progress)."""
        loss = float(self.loss.item()) if self.loss is not None else 0.0
        return {"loss_sum": loss, "samples": self.samples}

    def restore(self, mine: Mapping[str, Any]) -> None:
        """Keep a checkpoint's entry of this rank for the epoch it resumes."""
        self.resumed = (float(mine["loss_sum"]), int(mine["samples"]))


def report_epoch(
    metrics: Mapping[str, Any],
    loggers: Loggers,
    progress: bool,
    max_epochs: int | None,
    step_text: str,
) -> None:
    """Rank 0's record of an epoch: to the ``loggers`` (the metrics file, trackers) and,
    with ``progress``, a line on stdout (:func:`~devlayer.train.metrics.epoch_line`)."""
    loggers.log_metrics(dict(metrics))
    if progress:
        print(epoch_line(metrics, max_epochs, step_text), flush=True)
