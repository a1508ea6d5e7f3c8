"""The Trainer's optimizer steps: the epoch loop, micro-batches, gradient accumulation.

One :class:`OptimizerSteps` holds what a step needs (the strategy, the precision, the
optimizer and its scheduler, ``grad_accum``, ``clip_grad`` and how a batch gives a loss) and
where the run is. :meth:`~OptimizerSteps.run_epoch` feeds it one micro-batch at a time:
:meth:`~OptimizerSteps.micro_step` runs forward and backward (without the gradient reduction
while a window accumulates) and says whether the window ends; then
:meth:`~OptimizerSteps.step` steps the optimizer.

Example:
    >>> [ends_window(i, 5, grad_accum=2) for i in range(5)]  # the last window is shorter
    [False, True, False, True, True]
    >>> [window_size(i, 5, grad_accum=2) for i in range(5)]
    [2, 2, 2, 2, 1]
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import devlayer
from devlayer.errors import InvalidArgumentError
from devlayer.hangdump import comm_failure
from devlayer.ledger import publish_step
from devlayer.train.history import EpochSums, TrainingState
from devlayer.train.loading import to_device
from devlayer.train.metrics import batch_len
from devlayer.train.options import check_loss
from devlayer.train.precision import Precision
from devlayer.train.progress import RateLog
from devlayer.train.strategy import Strategy

__all__ = ["OptimizerSteps", "ends_window", "window_size"]

#: What a failed collective inside ``backward`` is called in its error.
_GRADIENT_REDUCTION = "the gradient reduction in backward (the strategy's own collective)"


def ends_window(index: int, n_batches: int, *, grad_accum: int) -> bool:
    """Whether micro-batch ``index`` (0-based in its epoch) ends an accumulation window:
    every ``grad_accum``-th one, and the epoch's last."""
    return (index + 1) % grad_accum == 0 or index + 1 == n_batches


def window_size(index: int, n_batches: int, *, grad_accum: int) -> int:
    """Micro-batches in the window of micro-batch ``index``: ``grad_accum``, or fewer in the
    epoch's last, shorter window (its step then weighs its samples as ``grad_accum=1``)."""
    return min(grad_accum, n_batches - (index - index % grad_accum))


class OptimizerSteps:
    """Forward, backward and optimizer step for one ``fit()``.

    Args:
        strategy: Skips the gradient reduction while a window accumulates.
        precision: Autocast, loss scaling and the (clipped, unscaled) optimizer step.
        model: The module whose parameters are clipped (the unwrapped one).
        optimizer: The optimizer; its gradients are cleared after each step.
        scheduler: Stepped after each optimizer step, or ``None``.
        grad_accum: Micro-batches per optimizer step.
        clip_grad: Max gradient norm, or ``None``.
        loss_fn: ``loss_fn(model(x), y)`` for ``(x, y)`` batches (when no training_step).
        training_step: ``training_step(model, batch) -> loss``, or ``None``.
        wrapped: The model as the strategy wrapped it (what forwards run through).
        state: The run's position (micro-batches and steps are counted there).
        sums: This rank's running loss sum and samples.
        device: Where batches go.
        log_every: Read the loss (a device sync) for the progress bar every N steps.
    """

    def __init__(
        self,
        *,
        strategy: Strategy,
        precision: Precision,
        model: Any,
        optimizer: Any,
        scheduler: Any,
        grad_accum: int,
        clip_grad: float | None,
        loss_fn: Callable[..., Any] | None,
        training_step: Callable[[Any, Any], Any] | None,
        wrapped: Any,
        state: TrainingState,
        sums: EpochSums,
        device: Any,
        log_every: int,
    ) -> None:
        self.strategy = strategy
        self.precision = precision
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.grad_accum = grad_accum
        self.clip_grad = clip_grad
        self.loss_fn = loss_fn
        self.training_step = training_step
        self.wrapped, self.state, self.sums = wrapped, state, sums
        self.device, self.log_every = device, log_every

    def loss(self, wrapped: Any, batch: Any) -> Any:
        """The loss of ``batch`` through the ``wrapped`` model (checked to be a scalar)."""
        if self.training_step is not None:
            return check_loss(self.training_step(wrapped, batch), "training_step")
        if not isinstance(batch, (list, tuple)) or len(batch) != 2:
            raise InvalidArgumentError(
                f"loss_fn needs (x, y) batches; got {type(batch).__name__} of length "
                f"{len(batch) if hasattr(batch, '__len__') else '?'}: pass training_step"
            )
        x, y = batch
        assert self.loss_fn is not None
        return check_loss(self.loss_fn(wrapped(x), y), "loss_fn")

    def micro_step(self, wrapped: Any, batch: Any, index: int, n_batches: int) -> tuple[Any, bool]:
        """Forward and backward of micro-batch ``index``; returns its loss and whether it
        ends an accumulation window (then :meth:`step` follows and gradients are reduced)."""
        boundary = ends_window(index, n_batches, grad_accum=self.grad_accum)
        window = window_size(index, n_batches, grad_accum=self.grad_accum)
        sync = contextlib.nullcontext() if boundary else self.strategy.accumulating(wrapped)
        with sync:
            with self.precision.autocast():
                loss = self.loss(wrapped, batch)
            # No division at grad_accum=1: one autograd node less per step.
            try:
                self.precision.scale(loss / window if window > 1 else loss).backward()
            except RuntimeError as exc:  # DDP's own all_reduce: torch's error, no report
                failure = comm_failure(exc, _GRADIENT_REDUCTION)
                if failure is None:
                    raise
                raise failure from exc
        return loss, boundary

    def step(self) -> None:
        """Step the optimizer (clipped, unscaled), clear its gradients, step the scheduler."""
        self.precision.step(self.optimizer, self.model.parameters(), self.clip_grad)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()

    def run_epoch(
        self,
        loader: Any,
        bar: Any,
        *,
        on_batch_end: Callable[[Any], None],
        after_step: Callable[[int], bool],
    ) -> tuple[Any, int, float, bool]:
        """One epoch from ``state.batches_done`` on, or until ``after_step`` says stop.

        Args:
            loader: The :class:`~devlayer.train.data.ShardedLoader` (its epoch is set here).
            bar: The progress bar, or ``None``.
            on_batch_end: Called with each micro-batch's loss, before its optimizer step.
            after_step: Called after each optimizer step with the epoch's micro-batches;
                ``True`` ends the epoch there.

        Returns:
            The loss sum (a device tensor), samples and seconds of this rank, and whether
            the epoch ran to its end.
        """
        st, sums = self.state, self.sums
        n_batches = len(loader)
        loader.set_epoch(st.epoch)
        if st.batches_done:
            loader.skip_batches(st.batches_done)
        self.wrapped.train()
        loss_sum = sums.start(resuming=st.batches_done > 0, device=self.device)
        on_accelerator = self.device.type != "cpu"  # CPU batches are already in place
        started = time.perf_counter()
        rate = RateLog(st.global_step, started, world_size=devlayer.world_size())
        for batch in loader:
            if on_accelerator:
                batch = to_device(batch, self.device)
            loss, boundary = self.micro_step(self.wrapped, batch, st.batches_done, n_batches)
            sums.add(loss, batch_len(batch))
            st.batches_done += 1
            on_batch_end(loss)
            if boundary:
                self.step()
                st.global_step += 1
                publish_step(st.global_step)  # for hang reports: one assignment
                if bar is not None and st.global_step - rate.step >= self.log_every:
                    samples_s = rate.text(step=st.global_step, samples=sums.samples)
                    bar.set_postfix(loss=f"{loss.item():.4g}", samples_s=samples_s)
            if bar is not None:  # after the step and its loss, so a progress line has both
                bar.update(1)
            if boundary and after_step(n_batches):
                break
        seconds = time.perf_counter() - started
        return loss_sum, sums.samples, seconds, st.batches_done >= n_batches
