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

import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import devlayer
from devlayer.errors import InvalidArgumentError
from devlayer.ledger import publish_step
from devlayer.train.bounds import Bounds
from devlayer.train.callbacks import Callback, EarlyStopping
from devlayer.train.checkpointing import Checkpointer
from devlayer.train.compile import compile_options
from devlayer.train.data import ShardedLoader, prepare_loader
from devlayer.train.elastic import (
    BatchPlan,
    WorldChange,
    check_resumable_data,
    data_position,
    requested_plan,
    same_plan,
)
from devlayer.train.errors import PreemptedError
from devlayer.train.loggers import Logger, Loggers
from devlayer.train.metrics import (
    append_metrics,
    batch_len,
    epoch_line,
    epoch_metrics,
    is_classification,
)
from devlayer.train.options import (
    callback_list,
    check_batches,
    check_loss,
    check_metrics,
    check_optimizer_params,
    check_options,
)
from devlayer.train.precision import Precision, resolve_precision
from devlayer.train.progress import progress_bar, resolve_progress_interval
from devlayer.train.seed import seed_everything
from devlayer.train.strategy import Strategy, from_name

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


def _bound(name: str) -> Any:
    return _view("bounds", name)


@dataclass
class _Progress:
    epoch: int = 0
    batches_done: int = 0  # micro-batches consumed in the current epoch
    global_step: int = 0  # optimizer steps
    history: list[dict[str, Any]] = field(default_factory=list)


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
        max_steps: Optimizer steps to run, across as many epochs as needed (a stop inside
            an epoch still validates and records that partial epoch). With both bounds
            the first one reached ends training; ``trainer.stop_reason`` and the last
            history entry's ``"stopped_by"`` say which.
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
        progress: Show progress and an epoch summary on rank 0: a tqdm bar when stderr is
            a terminal, otherwise (a job log) one plain line every ``progress_interval``
            seconds.
        progress_interval: Seconds between plain progress lines when stderr is not a
            terminal. Default: ``DEVLAYER_PROGRESS_INTERVAL`` or 30; 0 prints one line per
            micro-batch.
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
        preempt_check_every: On SIGTERM (preemption), all ranks agree to stop within two
            multiples of this many optimizer steps (one non-blocking scalar all_reduce on
            the CPU per check, read at the next check), save a checkpoint and raise
            :class:`PreemptedError`.
        strategy: ``"ddp"`` (replicas, the default) or ``"fsdp"``: the model, its gradients
            and the optimizer state are sharded over the ranks (FSDP2, on every backend
            that runs several processes); ``precision`` becomes FSDP's mixed-precision
            policy (``"16-mixed"`` is refused: use ``"bf16-mixed"``), gradient
            accumulation skips the reduce-scatter on the accumulating micro-batches, and
            checkpoints are sharded (each rank writes its own shards; a checkpoint resumes
            at another world size). Build ``optimizer`` from ``model.parameters()`` as
            usual: the Trainer points it at the shards. Or a
            :class:`~devlayer.train.strategy.Strategy` object (a subclass of
            ``DDPStrategy``, say, adding a gradient compression hook): the Trainer asks it
            to wrap, accumulate, cast, save and restore.
        fsdp: Options of :func:`devlayer.train.fsdp.shard_model` (``modules``,
            ``min_params``, ``cpu_offload``, ``reshard_after_forward``).
        compile: ``True`` (or a dict of ``torch.compile`` options) compiles the wrapped
            model. The compiler toolchain is checked first, with a clear error when it is
            missing (instead of an inductor traceback at the first step).
        optimize: Vendor model optimizations applied once, after the model is on its
            device and before DDP wraps it: ``"ipex"`` (``ipex.optimize`` on the cpu and
            xpu backends; needs ``pip install devlayer[ipex]`` with the matching torch),
            or a callable ``(model, optimizer) -> (model, optimizer)``. Default: None.
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
        # Long only by its 34 documented options: every one is checked (options.CHECKS)
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
        self.lr_scaling = lr_scaling
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
        self._optimized = False
        self.bounds.reset()
        self.amp: Precision | None = None  # decided in _setup, on the device
        self.state = _Progress()
        self.wrapped_model: Any = None  # the model as the strategy wrapped it
        self.resumed_from: Path | None = None
        self._lr_scaled = False
        self._lr_factor = 1.0
        self._loss_sum: Any = None
        self._samples = 0
        self._resumed_sums = (0.0, 0)
        self._plan: BatchPlan | None = None  # set with the training loader
        self._world_change: WorldChange | None = None

    max_epochs = _bound("max_epochs")
    max_steps = _bound("max_steps")
    early_stopping = _bound("early_stopping")
    preemption = _bound("preemption")
    preempted = _bound("preempted")
    stopped_early = _bound("stopped_early")
    stop_reason = _bound("reason")
    checkpoint_dir = _view("checkpoints", "directory")
    checkpoint_every = _view("checkpoints", "every")
    resume = _view("checkpoints", "resume")
    allow_world_size_change = _view("checkpoints", "allow_world_size_change")

    @property
    def scaler(self) -> Any:
        """The fp16 ``GradScaler`` (``None`` at other precisions and before ``fit``)."""
        return self.amp.scaler if self.amp is not None else None

    # ------------------------------------------------------------------ set-up

    def _setup(self) -> None:
        import torch

        if not devlayer.is_initialized():
            devlayer.init()
        st = devlayer.state()
        seed_everything(self.seed)
        self.device = st.device
        # Metric sums accumulate in float64 on the device (float32 on MPS, which has no
        # float64); with Python floats of the same dtype they cost one all_reduce per epoch.
        from devlayer.torchcompat import float_dtype

        self._acc_dtype = float_dtype(self.device)
        self.amp = self.strategy.precision(self.precision, self.device)
        self.autocast_dtype = self.amp.dtype
        if self.optimize is not None and not self._optimized:
            self._apply_optimize(torch, st.backend)
        # Before wrapping: FSDP rebinds the optimizer to the shards, by parameter identity.
        check_optimizer_params(self.model, self.optimizer)
        self.wrapped_model = self.strategy.wrap(self.model, self.optimizer, self.amp)
        if self.compile_options is not None:
            from devlayer.train.compile import compile_model

            self.wrapped_model = compile_model(
                self.wrapped_model, self.compile_options, self.device
            )
        if self.lr_scaling and not self._lr_scaled:
            factor = st.world_size if self.lr_scaling == "linear" else math.sqrt(st.world_size)
            _scale_lr(self.optimizer, self.scheduler, factor)
            self._lr_scaled = True
            self._lr_factor = factor
            if st.is_main and st.world_size > 1:
                lrs = [g["lr"] for g in self.optimizer.param_groups]
                log.warning(
                    "lr_scaling=%s x%.3g over %d ranks: learning rate(s) %s",
                    self.lr_scaling,
                    factor,
                    st.world_size,
                    lrs,
                )

    def _apply_optimize(self, torch: Any, backend: str) -> None:
        """Run the ``optimize=`` step once: on the device, before the DDP wrap."""
        self.model.to(self.device)
        if callable(self.optimize):
            result = self.optimize(self.model, self.optimizer)
            if not (isinstance(result, tuple) and len(result) == 2):
                raise InvalidArgumentError(
                    f"optimize={self.optimize!r} returned {type(result).__name__}; it must "
                    f"return a (model, optimizer) tuple"
                )
            model, optimizer = result
        else:
            from devlayer.train.optimize import apply_optimization

            dtype = self.autocast_dtype or torch.float32
            model, optimizer = apply_optimization(
                str(self.optimize), self.model, self.optimizer, backend=backend, dtype=dtype
            )
        if not isinstance(model, torch.nn.Module):
            raise InvalidArgumentError(
                f"optimize={self.optimize!r} returned a {type(model).__name__} as the model; "
                f"expected a torch.nn.Module"
            )
        self.model, self.optimizer = model, optimizer
        self._optimized = True

    def _train_loader(self, data: Any) -> ShardedLoader:
        """The training loader; records its batch plan (saved with the data position)."""
        if self._world_change is not None:
            check_resumable_data(data)
        loader = self._loader(data, shuffle=True)
        self._plan = BatchPlan(loader.batch_size, self.grad_accum, devlayer.world_size())
        return loader

    def _loader(self, data: Any, *, shuffle: bool) -> ShardedLoader:
        if isinstance(data, ShardedLoader):
            return data
        st = devlayer.state()
        per_step = self.batch_size
        if per_step is None:
            per_step = getattr(data, "batch_size", None)
            if per_step is None:
                raise InvalidArgumentError(
                    "Trainer needs batch_size (global samples per optimizer step) when "
                    "train_data is a Dataset"
                )
        if per_step % (st.world_size * self.grad_accum):
            raise InvalidArgumentError(
                f"batch_size={per_step} must split evenly into world_size={st.world_size} x "
                f"grad_accum={self.grad_accum} micro-batches; use a multiple of "
                f"{st.world_size * self.grad_accum}"
            )
        return prepare_loader(
            data,
            per_step // self.grad_accum,
            shuffle=shuffle,
            seed=self.seed,
            num_workers=self.num_workers,
            pad=shuffle,  # training pads (same steps on every rank); evaluation is exact
            # Training: a whole number of global batches per epoch, the same at any world
            # size (an exact resume at another one continues the same global order).
            step_samples=per_step if shuffle else None,
        )

    # ------------------------------------------------------------------ checkpoints

    def _payload(self, rank_states: list[Any], states: Mapping[str, Any]) -> dict[str, Any]:
        """The checkpoint's payload; ``states``: the strategy's model and optimizer entries."""
        st, plan = self.state, self._plan
        return {
            **states,
            "scaler": self.amp.state_dict() if self.amp is not None else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "epoch": self.state.epoch,
            "batches_done": self.state.batches_done,
            "global_step": self.state.global_step,
            "history": self.state.history,
            "early_stopping": (
                self.early_stopping.state_dict() if self.early_stopping is not None else None
            ),
            "ranks": rank_states,
            "lr_factor": self._lr_factor,
            # Where the epoch stands over all ranks: a resume at any world size continues it.
            "data": plan and data_position(self.seed, st.epoch, st.batches_done, plan),
        }

    def save_checkpoint(self, *, background: bool = False) -> Path | None:
        """Write a checkpoint now (collective: call on every rank). Returns rank 0's path
        (``None`` for a ``background`` save under ``checkpoint_async``)."""
        # Per rank: the running sums of the epoch in progress (and its RNG states).
        mine = {
            "loss_sum": float(self._loss_sum.item()) if self._loss_sum is not None else 0.0,
            "samples": self._samples,
        }
        return self.checkpoints.save(
            self.wrapped_model,
            self.optimizer,
            self._payload,
            mine,
            step=self.state.global_step,
            epoch=self.state.epoch,
            background=background,
        )

    def export(self, path: str | os.PathLike[str]) -> Path | None:
        """Write the trained model's full ``state_dict`` to one file, for inference.

        Rank 0 writes the file atomically. It holds tensors only, so it loads into the
        plain model on one process with ``torch.load(path, weights_only=True)``.

        Under ``strategy="fsdp"`` this is a collective: every rank must call it, because
        the shards are gathered (into rank 0's CPU memory, never onto one device), and a
        failed write raises on every rank. Under DDP it runs no collective, so the usual
        ``if devlayer.is_main(): trainer.export(path)`` works too.

        Args:
            path: The file to write (its folder must exist).

        Returns:
            ``path`` on rank 0, ``None`` on the other ranks.

        Raises:
            InvalidArgumentError: ``fit()`` has not set the model up yet.
            CheckpointError: Rank 0 could not write the file.
        """
        from devlayer.train.checkpoint import write_state_file
        from devlayer.train.errors import CheckpointError

        if self.wrapped_model is None:
            raise InvalidArgumentError("export() writes the trained model: call fit() first")
        collective = self.strategy.collective_export
        if not collective and not devlayer.is_main():
            return None
        state = self.strategy.full_state(self.wrapped_model)
        target, error = Path(path), None
        if devlayer.is_main():
            try:
                write_state_file(target, state)
            except CheckpointError as exc:
                error = str(exc)
        if collective:
            error = devlayer.broadcast_object(error, src=0)
        if error is not None:
            raise CheckpointError(f"rank 0 could not export the model to {target}: {error}")
        return target if devlayer.is_main() else None

    def _resume(self) -> None:
        # Collective: rank 0 locks the folder, checks it is writable before any step and
        # picks the checkpoint under the run rules (docs/checkpoints.md); all ranks agree.
        path = self.checkpoints.begin()
        if path is None:
            return
        self.checkpoints.load(path, self.wrapped_model, self.optimizer, self._apply)
        self.resumed_from = path
        if devlayer.is_main():
            log.warning(
                "resumed from %s (epoch %d, step %d)",
                path,
                self.state.epoch,
                self.state.global_step,
            )

    def _apply(self, payload: Mapping[str, Any], same_world: bool) -> None:
        """The payload's trainer state (the strategy restored model and optimizer)."""
        from devlayer.train.checkpoint import set_rng_state

        saved_factor = float(payload.get("lr_factor", 1.0))
        if saved_factor != self._lr_factor:
            # Saved with another world size under lr_scaling: the optimizer state carries the
            # old scaled rates; rescale them to this run's factor.
            _scale_lr(self.optimizer, None, self._lr_factor / saved_factor)
        if self.amp is not None:
            self.amp.load_state_dict(payload.get("scaler"))
        if self.scheduler is not None and payload.get("scheduler") is not None:
            self.scheduler.load_state_dict(payload["scheduler"])
        if self.early_stopping is not None and payload.get("early_stopping") is not None:
            self.early_stopping.load_state_dict(payload["early_stopping"])
        self.state.history = list(payload.get("history", []))
        if same_world and same_plan(payload, self._plan):
            self.state.epoch = int(payload["epoch"])
            self.state.batches_done = int(payload["batches_done"])
            self.state.global_step = int(payload["global_step"])
            mine = payload["ranks"][devlayer.rank()]
            set_rng_state(mine["rng"])
            self._resumed_sums = (float(mine["loss_sum"]), int(mine["samples"]))
        else:
            self._change_world(payload)

    def _change_world(self, payload: Mapping[str, Any]) -> None:
        """Another world size (or batch plan): keep the global batch, continue the epoch at
        its global position, re-seed per rank (docs/checkpoints.md)."""
        from devlayer.train.elastic import announce, plan_world_change

        st = devlayer.state()
        change = plan_world_change(
            payload,
            world=st.world_size,
            rank=st.rank,
            mode=self.allow_world_size_change,
            seed=self.seed,
        )
        if change.new is not None:
            self.grad_accum, self.batch_size = change.new.grad_accum, change.new.global_batch
        if change.lr_factor != 1.0:
            _scale_lr(self.optimizer, self.scheduler, change.lr_factor)
        self.state.epoch, self.state.global_step = change.epoch, change.step
        self.state.batches_done, self._resumed_sums = change.batches_done, change.sums
        announce(change, seed=self.seed, rank=st.rank, is_main=st.is_main)
        if st.is_main and self.metrics_file is not None:
            append_metrics(self.metrics_file, change.record())
        self._world_change = change

    # ------------------------------------------------------------------ training

    def _to_device(self, batch: Any) -> Any:
        import torch

        if isinstance(batch, torch.Tensor):
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, Mapping):
            return type(batch)({k: self._to_device(v) for k, v in batch.items()})  # type: ignore[call-arg]
        if isinstance(batch, (list, tuple)):
            return type(batch)(self._to_device(v) for v in batch)
        return batch

    def _loss(self, batch: Any) -> Any:
        if self.training_step is not None:
            return check_loss(self.training_step(self.wrapped_model, batch), "training_step")
        if not isinstance(batch, (list, tuple)) or len(batch) != 2:
            raise InvalidArgumentError(
                f"loss_fn needs (x, y) batches; got {type(batch).__name__} of length "
                f"{len(batch) if hasattr(batch, '__len__') else '?'}: pass training_step"
            )
        x, y = batch
        assert self.loss_fn is not None
        return check_loss(self.loss_fn(self.wrapped_model(x), y), "loss_fn")

    def _optimizer_step(self) -> None:
        assert self.amp is not None
        self.amp.step(self.optimizer, self.model.parameters(), self.clip_grad)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        self.state.global_step += 1
        publish_step(self.state.global_step)  # for hang reports: one assignment

    def _train_epoch(self, loader: ShardedLoader, bar: Any) -> tuple[Any, int, float, bool]:
        """One epoch (or until max_steps); returns (loss sum, samples, seconds, completed)."""
        import torch

        st = self.state
        n_batches = len(loader)
        loader.set_epoch(st.epoch)
        if st.batches_done:
            loader.skip_batches(st.batches_done)
        self.wrapped_model.train()
        resumed_loss, samples = self._resumed_sums if st.batches_done else (0.0, 0)
        self._resumed_sums = (0.0, 0)
        loss_sum = torch.full((), resumed_loss, device=self.device, dtype=self._acc_dtype)
        self._loss_sum = loss_sum
        on_accelerator = self.device.type != "cpu"  # CPU batches are already in place
        started = time.perf_counter()
        rate = _RateLog(st.global_step, started)
        for batch in loader:
            if on_accelerator:
                batch = self._to_device(batch)
            loss, boundary = self._micro_step(batch, n_batches)
            size = batch_len(batch)
            loss_sum.add_(loss.detach(), alpha=size)  # promotes into the float64 sum
            samples += size
            self._samples = samples
            st.batches_done += 1
            for cb in self.callbacks:
                cb.on_train_batch_end(self, loss)
            if boundary:
                self._optimizer_step()
                if bar is not None and st.global_step - rate.step >= self.log_every:
                    bar.set_postfix(loss=f"{loss.item():.4g}", samples_s=rate.text(st, samples))
            if bar is not None:  # after the step and its loss, so a progress line has both
                bar.update(1)
            if boundary and self._end_of_step(n_batches):
                break
        return loss_sum, samples, time.perf_counter() - started, st.batches_done >= n_batches

    def _micro_step(self, batch: Any, n_batches: int) -> tuple[Any, bool]:
        """Forward and backward of one micro-batch; returns its loss and whether it ends
        an accumulation window (then the optimizer steps and gradients are reduced)."""
        assert self.amp is not None
        index = self.state.batches_done
        boundary = (index + 1) % self.grad_accum == 0 or index + 1 == n_batches
        # The epoch's last window may be shorter: average over the micro-batches it has,
        # so its step weighs its samples as grad_accum=1 would.
        window = min(self.grad_accum, n_batches - (index - index % self.grad_accum))
        sync = (
            contextlib.nullcontext() if boundary else self.strategy.accumulating(self.wrapped_model)
        )
        with sync:
            with self.amp.autocast():
                loss = self._loss(batch)
            # No division at grad_accum=1: one autograd node less per step.
            self.amp.scale(loss / window if window > 1 else loss).backward()
        return loss, boundary

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

    def _validate(self, loader: ShardedLoader | None) -> dict[str, Any]:
        """Per-rank sums of validation metrics (on the device, no collective here)."""
        import torch

        sums: dict[str, Any] = {}
        if loader is None:
            return sums
        model = self.strategy.validation_model(self.wrapped_model)
        model.eval()
        count = 0
        assert self.amp is not None
        # Forwards that are collectives (FSDP): as many as the rank with the most batches.
        fillers = self.strategy.validation_fillers(len(loader))
        batch = None
        with torch.no_grad(), self.amp.autocast():
            for batch in loader:
                batch = self._to_device(batch)
                size = batch_len(batch)
                values = self._validation_values(model, batch)
                for key, value in values.items():
                    value = torch.as_tensor(value, device=self.device).detach()
                    value = value.to(self._acc_dtype)
                    sums[key] = sums.get(key, 0) + value * size
                count += size
            for _ in range(fillers):
                self._validation_values(model, batch)
        sums["_val_count"] = float(count)
        return sums

    def _validation_values(self, model: Any, batch: Any) -> dict[str, Any]:
        if self.validation_step is not None:
            return check_metrics(self.validation_step(model, batch), "validation_step")
        x, y = batch
        out = model(x)
        assert self.loss_fn is not None
        values = {"val_loss": self.loss_fn(out, y)}
        if is_classification(out, y):
            values["val_accuracy"] = (out.argmax(dim=-1) == y).float().mean()
        return values

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
        self._setup()
        # Resume first: at another world size it re-derives the batch plan the loader uses.
        self._plan = requested_plan(train_data, self.batch_size, self.grad_accum)
        self._resume()
        train_loader = self._train_loader(train_data)
        check_batches(len(train_loader), devlayer.rank(), self.max_steps)
        val_loader = self._loader(val_data, shuffle=False) if val_data is not None else None
        self.loggers.start(self)  # after the resume: continue its tracker runs
        for cb in self.callbacks:
            cb.on_fit_start(self)
        main = devlayer.is_main()
        st = self.state
        bounds = self.bounds
        if bounds.start(st.epoch, st.global_step, self.resumed_from) is None:
            self._continue_history()
        while bounds.reason is None:
            bar = self._progress_bar(len(train_loader)) if self.progress and main else None
            try:
                loss_sum, samples, seconds, completed = self._train_epoch(train_loader, bar)
            finally:
                if bar is not None:
                    bar.close()
            if not completed and bounds.preempted:  # inside the epoch: save where we are
                if self.checkpoints.on_preemption():
                    self.save_checkpoint()
                self._raise_preempted()
            for cb in self.callbacks:
                cb.on_train_epoch_end(self)
            metrics = self._end_epoch(
                val_loader, loss_sum, samples, seconds, completed, len(train_loader)
            )
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
                self._report(metrics)
            if bounds.preempted:
                self._raise_preempted()
        bounds.preemption.settle()  # no collective left in flight when fit returns
        if main and self.progress:
            summary = bounds.summary(st.history, st.epoch, st.global_step, self.resumed_from)
            print(summary, flush=True)
        for cb in self.callbacks:
            cb.on_fit_end(self, st.history)
        return st.history

    def _continue_history(self) -> None:
        """Training goes on from a checkpoint: its last entry no longer ends the run.

        A partial epoch (``max_steps`` stopped inside it) is dropped: this run trains the
        rest of that epoch and records it whole, resumed loss sums included.
        """
        history = self.state.history
        if history and history[-1].get("partial"):
            history.pop()
        elif history:
            history[-1] = {k: v for k, v in history[-1].items() if k != "stopped_by"}

    def _end_epoch(
        self,
        val_loader: ShardedLoader | None,
        loss_sum: Any,
        samples: int,
        seconds: float,
        completed: bool,
        n_batches: int,
    ) -> dict[str, Any]:
        """Validate, reduce the epoch's metrics in ONE collective and append them.

        A partial epoch keeps its running sums (a checkpoint of that position follows) and
        validates under a saved RNG state, so resuming from it continues bit-exactly.
        """
        from devlayer.train.rng import rng_state, set_rng_state

        if completed:
            self._loss_sum, self._samples = None, 0
            sums = self._validate(val_loader)
        else:
            saved = rng_state()
            sums = self._validate(val_loader)
            set_rng_state(saved)
        sums["_train_loss"] = loss_sum.clone()  # reduced in place; the running sum stays
        sums["_train_count"] = float(samples)
        sums["_seconds"] = float(seconds)
        sums = devlayer.all_reduce(sums, op="sum")  # ONE collective: floats join the sums' buffer
        metrics = self._epoch_metrics(sums)
        if not completed:
            metrics["partial"] = True
            metrics["batches"] = self.state.batches_done
            metrics["batches_per_epoch"] = n_batches
        self.state.history.append(metrics)
        return metrics

    def _progress_bar(self, total: int) -> Any:
        """A tqdm bar on a terminal; plain timed lines in a job log (no carriage returns)."""
        return progress_bar(
            total=total,
            initial=self.state.batches_done,
            desc=self.bounds.epoch_text(self.state.epoch),
            interval=self.progress_interval,
            stream=sys.stderr,
            step=self._step_text,
        )

    def _step_text(self) -> str:
        return self.bounds.step_text(self.state.global_step)

    def _raise_preempted(self) -> None:
        st = self.state
        raise self.bounds.preempted_error(st.global_step, st.epoch, self.checkpoint_dir)

    def _epoch_metrics(self, sums: Mapping[str, Any]) -> dict[str, Any]:
        return epoch_metrics(
            sums,
            epoch=self.state.epoch + 1,
            global_step=self.state.global_step,
            world_size=devlayer.world_size(),
            lr=float(self.optimizer.param_groups[0]["lr"]),
            reference_throughput=self.reference_throughput,
        )

    def _report(self, metrics: dict[str, Any]) -> None:
        self.loggers.log_metrics(metrics)
        if self.progress:
            print(epoch_line(metrics, self.max_epochs, self._step_text()), flush=True)


# ---------------------------------------------------------------------- helpers


class _RateLog:
    """Samples/s over all ranks since the previous progress postfix."""

    def __init__(self, step: int, now: float) -> None:
        self.step, self.time, self.samples = step, now, 0

    def text(self, state: _Progress, samples: int) -> str:
        now = time.perf_counter()
        rate = (samples - self.samples) * devlayer.world_size() / max(now - self.time, 1e-9)
        self.step, self.time, self.samples = state.global_step, now, samples
        return f"{rate:.0f}"


def _scale_lr(optimizer: Any, scheduler: Any, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
    if scheduler is not None and hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
