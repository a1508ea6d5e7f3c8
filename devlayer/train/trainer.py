"""``Trainer``: the hand-written DDP loop, written once, on devlayer's public API.

It does what the usual torchrun script does by hand — DDP wrapping, sharded loading with
``set_epoch``, global-batch splitting, AMP, gradient accumulation with ``no_sync``,
clipping, averaged validation metrics in ONE collective, early stopping, throughput —
plus atomic checkpoints that resume bit-exactly. No vendor if-chains: the device comes
from :func:`devlayer.device`, the collectives from :mod:`devlayer.comm`.

Example:
    >>> import torch, devlayer
    >>> from torch.utils.data import TensorDataset
    >>> x = torch.linspace(0, 1, 64).unsqueeze(1); y = 2 * x
    >>> net = torch.nn.Linear(1, 1)
    >>> opt = torch.optim.SGD(net.parameters(), lr=0.5)
    >>> trainer = devlayer.Trainer(net, opt, torch.nn.functional.mse_loss, batch_size=16,
    ...                            max_epochs=20, progress=False, num_workers=0)
    >>> history = trainer.fit(TensorDataset(x, y))
    >>> history[-1]["train_loss"] < 0.01
    True
    >>> _ = devlayer.shutdown()
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import devlayer
from devlayer.errors import InvalidArgumentError
from devlayer.train.bounds import Bounds
from devlayer.train.callbacks import Callback, EarlyStopping
from devlayer.train.checkpointing import Checkpointer
from devlayer.train.compile import compile_options
from devlayer.train.data import ShardedLoader
from devlayer.train.elastic import BatchPlan, WorldChange, check_resumable_data, requested_plan
from devlayer.train.errors import PreemptedError
from devlayer.train.fit_setup import set_up_fit
from devlayer.train.history import EpochSums, TrainingState, report_epoch
from devlayer.train.loading import fit_loader
from devlayer.train.loggers import Logger, Loggers
from devlayer.train.lr_scaling import LrScaling
from devlayer.train.options import (
    callback_list,
    check_batches,
    check_options,
)
from devlayer.train.payload import TrainerPayload
from devlayer.train.precision import Precision, resolve_precision
from devlayer.train.progress import epoch_progress, resolve_progress_interval
from devlayer.train.steps import OptimizerSteps
from devlayer.train.strategy import Strategy, from_name
from devlayer.train.validation import Validator, reduce_epoch

__all__ = [
    "Callback",
    "EarlyStopping",
    "PreemptedError",
    "Trainer",
    "resolve_precision",
    "resolve_progress_interval",
]

log = logging.getLogger("devlayer.train")


def _view(part: str, name: str) -> Any:
    """A read-only Trainer attribute that shows ``trainer.<part>.<name>``."""
    return property(lambda self: getattr(getattr(self, part), name), doc=f"``{part}.{name}``.")


class Trainer:
    """Train a model with DDP on whatever devlayer selected.

    Every argument is checked here, before anything runs: a wrong type or range raises
    :class:`~devlayer.errors.InvalidArgumentError` naming the argument and the value.

    Args:
        model: The ``torch.nn.Module``. It is moved and wrapped in place; after ``fit`` it
            holds the trained weights.
        optimizer: An optimizer over ``model``'s parameters (``fit`` refuses one that holds
            none of them).
        loss_fn: ``loss_fn(model(x), y)`` for ``(x, y)`` batches. Also used for validation.
        precision: ``"32"``, ``"bf16-mixed"`` or ``"16-mixed"`` (GradScaler only for fp16).
            Default: ``ACCELERATE_MIXED_PRECISION`` or ``"32"``.
        grad_accum: Micro-batches per optimizer step; all but the last skip the gradient
            all-reduce (``no_sync``). An epoch's last, shorter window still makes a step,
            averaged over the micro-batches it has.
        clip_grad: Max gradient norm (``None``: no clipping).
        max_epochs: Epochs to run. Default: 1, or no bound when ``max_steps`` is given.
        max_steps: Optimizer steps to run, across epochs (a stop inside an epoch records
            that partial epoch). With both bounds the first reached ends training
            (``trainer.stop_reason`` and the last history entry's ``"stopped_by"``).
        batch_size: GLOBAL samples per optimizer step (over all ranks and micro-batches).
        lr_scaling: ``"linear"`` or ``"sqrt"``: multiply learning rates by the world size
            (or its square root) once at the start; ``None`` leaves them.
        checkpoint_dir: Where to keep atomic checkpoints (rank 0 writes). ``fit()`` checks
            it is writable before the first step and locks it: one job per folder.
        checkpoint_every: Save every N optimizer steps (also at each epoch end when set).
        checkpoint_async: Write the periodic saves in the background (staged to CPU
            memory first; at most one in flight; the run's last save is synchronous).
            See docs/checkpoints.md, "Asynchronous checkpoints".
        resume: ``"auto"`` (newest valid checkpoint in ``checkpoint_dir``, continuing its
            run), a path (needs ``checkpoint_dir``), or None (a fresh run: refused when
            ``checkpoint_dir`` already holds checkpoints). The rules: docs/checkpoints.md,
            "Run identity".
        seed: Seeds random/NumPy/torch per rank and the data order (0 <= seed < 2**63).
        early_stopping: An :class:`EarlyStopping`.
        metrics_file: JSON lines, one per epoch, written by rank 0.
        loggers: Where else the epoch metrics go (rank 0): ``"tensorboard"``,
            ``"mlflow"``, ``"jsonl"`` or :class:`~devlayer.train.loggers.Logger` objects;
            files under the run's folder (``metrics_file``'s, else ``checkpoint_dir``). A
            resume continues the same tracker run. See docs/training.md, "Experiment
            trackers".
        progress: Show progress and an epoch summary on rank 0: a tqdm bar on a terminal,
            else (a job log) a plain line every ``progress_interval`` seconds.
        progress_interval: Seconds between plain progress lines (0: one per micro-batch).
            Default: ``DEVLAYER_PROGRESS_INTERVAL`` or 30.
        callbacks: An iterable of :class:`Callback` instances.
        training_step: ``training_step(model, batch) -> loss`` instead of ``loss_fn``.
        validation_step: ``validation_step(model, batch) -> dict of per-batch means``
            (weighted by batch size when averaged); default: loss and accuracy from loss_fn.
        scheduler: An LR scheduler stepped after each optimizer step.
        num_workers: DataLoader workers per rank (``"auto"``), at most the CPUs a rank may
            use (:func:`~devlayer.train.data.max_num_workers`).
        log_every: Read the running loss (a device sync) every N optimizer steps.
        reference_throughput: World-size-1 samples/s, to report scaling efficiency.
        allow_world_size_change: Resume a checkpoint saved with another world size,
            exactly: the global batch is kept (per-rank batch and ``grad_accum``
            re-derived), the epoch continues at its exact sample, per-rank generators are
            re-seeded from (seed, step, rank). ``"rescale_lr"`` keeps the per-rank batch and
            accumulation instead and scales the learning rate with the global batch.
            What is refused: docs/checkpoints.md, "Resume at another world size".
        preempt_check_every: On SIGTERM, all ranks agree to stop within two multiples of
            this many optimizer steps (one non-blocking scalar all_reduce per check), save a
            checkpoint and raise :class:`PreemptedError`.
        strategy: ``"ddp"`` (replicas, the default), ``"fsdp"`` (model, gradients and
            optimizer state sharded over the ranks, sharded checkpoints; docs/training.md,
            "The Trainer with strategy="fsdp"") or a
            :class:`~devlayer.train.strategy.Strategy` object (a ``DDPStrategy`` subclass
            adding a gradient compression hook, say).
        fsdp: Options of :func:`devlayer.train.fsdp.shard_model` (``modules``,
            ``min_params``, ``cpu_offload``, ``reshard_after_forward``).
        compile: ``True`` (or a dict of ``torch.compile`` options) compiles the wrapped
            model, after checking the compiler toolchain (a clear error when it is missing).
        optimize: A model optimization run once, on the device, before wrapping: a
            registered name (``"ipex"``: ``pip install devlayer[ipex]``) or a callable
            ``(model, optimizer) -> (model, optimizer)``. Default: None.
    """

    def __init__(
        self,
        model: Any,
        optimizer: Any,
        loss_fn: Callable[..., Any] | None = None,
        *,
        precision: str | None = None,
        grad_accum: int = 1,
        clip_grad: float | None = None,
        max_epochs: int | None = None,
        max_steps: int | None = None,
        batch_size: int | None = None,
        lr_scaling: str | None = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        checkpoint_every: int | None = None,
        checkpoint_async: bool = False,
        resume: str | os.PathLike[str] | None = "auto",
        seed: int = 0,
        early_stopping: EarlyStopping | None = None,
        metrics_file: str | os.PathLike[str] | None = None,
        loggers: Sequence[str | Logger] = (),
        progress: bool = True,
        progress_interval: float | None = None,
        callbacks: Sequence[Callback] = (),
        training_step: Callable[[Any, Any], Any] | None = None,
        validation_step: Callable[[Any, Any], Mapping[str, Any]] | None = None,
        scheduler: Any = None,
        num_workers: int | str = "auto",
        log_every: int = 50,
        reference_throughput: float | None = None,
        allow_world_size_change: bool | str = False,
        preempt_check_every: int = 10,
        optimize: str | Callable[[Any, Any], tuple[Any, Any]] | None = None,
        strategy: str | Strategy = "ddp",
        fsdp: Mapping[str, Any] | None = None,
        compile: bool | Mapping[str, Any] = False,
    ) -> None:
        # Long only by its 35 documented options: every one is checked (options.CHECKS)
        # before anything is assigned; the per-run state is in _reset_run_state.
        check_options({k: v for k, v in locals().items() if k != "self"})
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.precision = resolve_precision(precision)
        self.grad_accum = grad_accum
        self.clip_grad = clip_grad
        #: When the run stops: max_epochs, max_steps, early stopping, preemption.
        self.bounds = Bounds(
            max_epochs=max_epochs,
            max_steps=max_steps,
            early_stopping=early_stopping,
            preempt_check_every=preempt_check_every,
        )
        self.batch_size = batch_size
        #: ``lr_scaling``: the factor applied to the learning rates, once.
        self.lr_scale = LrScaling(lr_scaling)
        self.seed = seed
        self.metrics_file = Path(metrics_file) if metrics_file is not None else None
        #: Where the epoch metrics go (rank 0): the JSONL file, trackers, your own.
        self.loggers = Loggers.build(
            loggers,
            metrics_file=self.metrics_file,
            checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir is not None else None,
        )
        self.progress = progress
        self.progress_interval = resolve_progress_interval(progress_interval)
        self.callbacks = callback_list(callbacks)
        self.training_step = training_step
        self.validation_step = validation_step
        self.scheduler = scheduler
        self.num_workers = num_workers
        self.log_every = log_every
        self.reference_throughput = reference_throughput
        self.optimize = optimize
        #: How the model is distributed: wrapping, accumulation, precision, state.
        self.strategy = from_name(strategy, fsdp=fsdp, trainer=True)
        #: Where, when and how checkpoints are saved and resumed.
        self.checkpoints = Checkpointer(
            Path(checkpoint_dir) if checkpoint_dir is not None else None,
            every=checkpoint_every,
            resume=resume,
            allow_world_size_change=allow_world_size_change,
            strategy=self.strategy,
            asynchronous=checkpoint_async,
        )
        self.compile_options = compile_options(compile)
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        """What ``fit()`` builds up: position, wrapped model, precision, stop flags."""
        self.optimization_applied = False
        self.grow_back_checked = False  # allow_world_size_change vs the launcher, once
        self.bounds.reset()
        #: The precision object (autocast, fp16 scaler), decided in _setup, on the device.
        self.precision_policy: Precision | None = None
        self.state = TrainingState()
        #: This rank's running sums of the epoch in progress (checkpoints keep them).
        self.epoch_sums = EpochSums()
        self.wrapped_model: Any = None  # the model as the strategy wrapped it
        self.resumed_from: Path | None = None
        self.steps: OptimizerSteps | None = None  # built in _setup, around the wrapped model
        self.validator: Validator | None = None
        self.payload: TrainerPayload | None = None
        self.plan: BatchPlan | None = None  # the batch plan, saved with the data position
        self.world_change: WorldChange | None = None  # a resume at another world size

    max_epochs = _view("bounds", "max_epochs")
    max_steps = _view("bounds", "max_steps")
    early_stopping = _view("bounds", "early_stopping")
    preemption = _view("bounds", "preemption")
    preempted = _view("bounds", "preempted")
    stopped_early = _view("bounds", "stopped_early")
    stop_reason = _view("bounds", "reason")
    checkpoint_dir = _view("checkpoints", "directory")
    checkpoint_every = _view("checkpoints", "every")
    resume = _view("checkpoints", "resume")
    allow_world_size_change = _view("checkpoints", "allow_world_size_change")
    lr_scaling = _view("lr_scale", "mode")

    @property
    def scaler(self) -> Any:
        """The fp16 ``GradScaler`` (``None`` at other precisions and before ``fit``)."""
        return self.precision_policy.scaler if self.precision_policy is not None else None

    def _setup(self) -> None:
        """Everything ``fit()`` prepares before its first step (:mod:`.fit_setup`)."""
        set_up_fit(self)

    def save_checkpoint(self, *, background: bool = False) -> Path | None:
        """Write a checkpoint now (collective: call on every rank). Returns rank 0's path
        (``None`` for a ``background`` save under ``checkpoint_async``)."""
        if self.payload is None:
            raise InvalidArgumentError("save_checkpoint() saves a run: call fit() first")
        # Per rank: the running sums of the epoch in progress (and its RNG states).
        return self.checkpoints.save(
            self.wrapped_model,
            self.optimizer,
            self.payload.build,
            self.epoch_sums.mine(),
            step=self.state.global_step,
            epoch=self.state.epoch,
            background=background,
        )

    def export(self, path: str | os.PathLike[str]) -> Path | None:
        """Write the trained model's full ``state_dict`` to one file, for inference.

        Rank 0 writes it atomically, tensors only: ``torch.load(path, weights_only=True)``
        loads it into the plain model. Under ``strategy="fsdp"`` every rank must call it
        (a collective: :func:`~devlayer.train.export.export_model`); under DDP the usual
        ``if devlayer.is_main(): trainer.export(path)`` works too.

        Args:
            path: The file to write (its folder must exist).

        Returns:
            ``path`` on rank 0, ``None`` on the other ranks.

        Raises:
            InvalidArgumentError: ``fit()`` has not set the model up yet.
            CheckpointError: Rank 0 could not write the file (on every rank under FSDP).
        """
        from devlayer.train.export import export_model

        if self.wrapped_model is None:
            raise InvalidArgumentError("export() writes the trained model: call fit() first")
        return export_model(self.strategy, self.wrapped_model, path)

    def _resume(self) -> None:
        # Collective: rank 0 locks the folder, checks it is writable before any step and
        # picks the checkpoint under the run rules (docs/checkpoints.md); all ranks agree.
        path = self.checkpoints.begin()
        if path is None:
            return
        assert self.payload is not None
        self.checkpoints.load(path, self.wrapped_model, self.optimizer, self.payload.apply)
        self.resumed_from = path
        if devlayer.is_main():
            st = self.state
            log.warning("resumed from %s (epoch %d, step %d)", path, st.epoch, st.global_step)

    def _batch_end(self, loss: Any) -> None:
        for cb in self.callbacks:
            cb.on_train_batch_end(self, loss)

    def _end_of_step(self, n_batches: int) -> bool:
        """After an optimizer step: preemption check and periodic save; True stops the epoch."""
        st = self.state
        self.checkpoints.poll()  # a background save's outcome, on every rank alike
        if self.bounds.preempt_now(st.global_step, devlayer.world_size()):
            return True
        # The epoch-end (or end-of-run) save follows these: no second write of the step.
        last_of_epoch = st.batches_done >= n_batches
        last_step = self.bounds.last_step(st.global_step)
        if self.checkpoints.after_step(
            st.global_step, last_of_epoch=last_of_epoch, last_step=last_step
        ):
            self.save_checkpoint(background=True)
        return last_step

    def fit(self, train_data: Any, val_data: Any = None) -> list[dict[str, Any]]:
        """Train; returns the history (one dict of averaged metrics per epoch).

        Args:
            train_data: A Dataset, DataLoader or :class:`~devlayer.train.data.ShardedLoader`.
            val_data: Optional validation data, averaged over all ranks each epoch.

        Returns:
            ``[{"epoch", "train_loss", "val_loss", "val_accuracy", "samples_per_sec",
            "epoch_time", "global_step", ...}, ...]`` including resumed epochs.
        """
        with self.bounds.preemption.catch():
            try:
                return self._fit(train_data, val_data)
            finally:
                self.loggers.close()
                self.checkpoints.end()  # release the checkpoint folder's lock

    def _fit(self, train_data: Any, val_data: Any) -> list[dict[str, Any]]:
        loaders = self._start(train_data, val_data)
        st, bounds = self.state, self.bounds
        while bounds.reason is None:
            self._run_epoch(*loaders)
        bounds.preemption.settle()  # no collective left in flight when fit returns
        if devlayer.is_main() and self.progress:
            summary = bounds.summary(st.history, st.epoch, st.global_step, self.resumed_from)
            print(summary, flush=True)
        for cb in self.callbacks:
            cb.on_fit_end(self, st.history)
        return st.history

    def _start(self, train_data: Any, val_data: Any) -> tuple[ShardedLoader, Any]:
        """Set up, resume, make the loaders; returns the train and validation loaders.

        The resume comes first: at another world size it re-derives the batch plan (per-rank
        batch and ``grad_accum``) the training loader is built with.
        """
        self._setup()
        self.plan = requested_plan(train_data, self.batch_size, self.grad_accum)
        self._resume()
        if self.world_change is not None:
            check_resumable_data(train_data)
        load = functools.partial(
            fit_loader,
            batch_size=self.batch_size,
            grad_accum=self.grad_accum,
            seed=self.seed,
            num_workers=self.num_workers,
        )
        train_loader = load(train_data, shuffle=True)
        self.plan = BatchPlan(train_loader.batch_size, self.grad_accum, devlayer.world_size())
        check_batches(len(train_loader), devlayer.rank(), self.max_steps)
        val_loader = load(val_data, shuffle=False) if val_data is not None else None
        self.loggers.start(self)  # after the resume: continue its tracker runs
        if self.world_change is not None:  # why the curves jump here, in every logger
            change = self.world_change
            self.loggers.log_event("world_size_change", change.data(), change.step)
        for cb in self.callbacks:
            cb.on_fit_start(self)
        st = self.state
        if self.bounds.start(st.epoch, st.global_step, self.resumed_from) is None:
            st.continue_history()
        return train_loader, val_loader

    def _run_epoch(self, train_loader: ShardedLoader, val_loader: Any) -> None:
        """Train one epoch (or up to a stop), validate, record, save and report it."""
        main = devlayer.is_main()
        st, bounds, steps, validator = self.state, self.bounds, self.steps, self.validator
        assert steps is not None and validator is not None
        progress = self.progress and main
        bar = (
            epoch_progress(len(train_loader), st, bounds, self.progress_interval)
            if progress
            else None
        )
        try:
            loss_sum, samples, seconds, completed = steps.run_epoch(
                train_loader, bar, on_batch_end=self._batch_end, after_step=self._end_of_step
            )
        finally:
            if bar is not None:
                bar.close()
        if not completed and bounds.preempted:  # inside the epoch: save where we are
            if self.checkpoints.on_preemption():
                self.save_checkpoint()
            self._raise_preempted()
        for cb in self.callbacks:
            cb.on_train_epoch_end(self)
        # Validate, then reduce the epoch's metrics in ONE collective. A partial epoch keeps
        # its running sums (a checkpoint of that position follows).
        if completed:
            self.epoch_sums.clear()
        train = (loss_sum, samples, seconds)
        sums = reduce_epoch(validator, self.wrapped_model, val_loader, train, completed=completed)
        lr = float(self.optimizer.param_groups[0]["lr"])
        metrics = st.record_epoch(sums, completed, len(train_loader), lr, self.reference_throughput)
        if completed:
            st.epoch += 1
            st.batches_done = 0
        bounds.end_epoch(metrics, completed=completed, epoch=st.epoch, step=st.global_step)
        # A preemption agreed on the epoch's last step: finish its bookkeeping first.
        finished = bounds.reason is not None or bounds.preempted
        if self.checkpoints.after_epoch(finished=finished):
            self.save_checkpoint(background=not finished)
        for cb in self.callbacks:
            cb.on_epoch_end(self, metrics)
        if main:
            step_text = bounds.step_text(st.global_step)
            report_epoch(metrics, self.loggers, self.progress, self.max_epochs, step_text)
        if bounds.preempted:
            self._raise_preempted()

    def _raise_preempted(self) -> None:
        st = self.state
        raise self.bounds.preempted_error(st.global_step, st.epoch, self.checkpoint_dir)
