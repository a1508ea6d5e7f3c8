"""What ``Trainer.fit()`` prepares before its first step, in order.

:func:`set_up_fit` initializes devlayer when the script did not, warns once when
``allow_world_size_change`` cannot grow the job back under its launcher, seeds every
generator, decides the precision on the device, applies a named optimization once, checks
that the optimizer holds the model's parameters, lets the strategy wrap the model (then
``torch.compile`` when asked), applies the learning-rate scaling and builds the loop's parts:
the :class:`~devlayer.train.steps.OptimizerSteps`, the
:class:`~devlayer.train.validation.Validator` and the
:class:`~devlayer.train.payload.TrainerPayload`.
"""

from __future__ import annotations

from typing import Any

import devlayer
from devlayer.train.elastic import warn_if_cannot_grow_back
from devlayer.train.options import check_optimizer_params
from devlayer.train.payload import TrainerPayload
from devlayer.train.seed import seed_everything
from devlayer.train.steps import OptimizerSteps
from devlayer.train.validation import Validator

__all__ = ["set_up_fit"]


def set_up_fit(trainer: Any) -> None:
    """Prepare ``trainer`` (a :class:`~devlayer.train.trainer.Trainer`) for ``fit()``.

    Sets its ``device``, ``precision_policy``, ``autocast_dtype``, ``wrapped_model``,
    ``steps``, ``validator`` and ``payload``; ``model`` and ``optimizer`` change only
    through a named optimization (``optimize=``), applied once per Trainer.
    """
    if not devlayer.is_initialized():
        devlayer.init()
    st = devlayer.state()
    warn_if_cannot_grow_back(trainer)  # once per Trainer, on rank 0
    seed_everything(trainer.seed)
    trainer.device = st.device
    trainer.precision_policy = trainer.strategy.precision(trainer.precision, trainer.device)
    trainer.autocast_dtype = trainer.precision_policy.dtype
    if trainer.optimize is not None and not trainer.optimization_applied:
        from devlayer.train.optimize import optimize_model

        trainer.model, trainer.optimizer = optimize_model(
            trainer.optimize,
            trainer.model,
            trainer.optimizer,
            device=trainer.device,
            backend=st.backend,
            dtype=trainer.autocast_dtype,
        )
        trainer.optimization_applied = True
    # Before wrapping: FSDP rebinds the optimizer to the shards, by parameter identity.
    check_optimizer_params(trainer.model, trainer.optimizer)
    wrapped = trainer.strategy.wrap(trainer.model, trainer.optimizer, trainer.precision_policy)
    if trainer.compile_options is not None:
        from devlayer.train.compile import compile_model

        wrapped = compile_model(wrapped, trainer.compile_options, trainer.device)
    trainer.wrapped_model = wrapped
    trainer.lr_scale.apply(
        trainer.optimizer, trainer.scheduler, world_size=st.world_size, is_main=st.is_main
    )
    _build_loop_parts(trainer)


def _build_loop_parts(trainer: Any) -> None:
    """The step and validation objects, around the model and precision of this fit."""
    trainer.steps = OptimizerSteps(
        strategy=trainer.strategy,
        precision=trainer.precision_policy,
        model=trainer.model,
        optimizer=trainer.optimizer,
        scheduler=trainer.scheduler,
        grad_accum=trainer.grad_accum,
        clip_grad=trainer.clip_grad,
        loss_fn=trainer.loss_fn,
        training_step=trainer.training_step,
        wrapped=trainer.wrapped_model,
        state=trainer.state,
        sums=trainer.epoch_sums,
        device=trainer.device,
        log_every=trainer.log_every,
    )
    trainer.validator = Validator(
        strategy=trainer.strategy,
        precision=trainer.precision_policy,
        loss_fn=trainer.loss_fn,
        validation_step=trainer.validation_step,
        device=trainer.device,
    )
    #: What checkpoints hold of this Trainer beside model and optimizer.
    trainer.payload = TrainerPayload(
        trainer.steps, trainer.lr_scale, trainer.early_stopping, seed=trainer.seed, trainer=trainer
    )
