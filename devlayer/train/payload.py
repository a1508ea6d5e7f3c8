"""What a checkpoint holds of a Trainer beside model and optimizer, and how it comes back.

The strategy saves and restores model and optimizer state; :class:`TrainerPayload` adds the
rest of the run: position and history, every rank's RNG state and running sums, the fp16
loss scaler, the LR scheduler, early stopping and the learning-rate factor. The key names are
those of checkpoint formats 1-3.

Example:
    >>> import torch
    >>> from devlayer.train.history import EpochSums, TrainingState
    >>> from devlayer.train.lr_scaling import LrScaling
    >>> from devlayer.train.precision import Precision
    >>> from devlayer.train.steps import OptimizerSteps
    >>> from devlayer.train.strategy import from_name
    >>> net = torch.nn.Linear(1, 1)
    >>> steps = OptimizerSteps(strategy=from_name("ddp"), precision=Precision("32", "cpu"),
    ...     model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), scheduler=None,
    ...     grad_accum=1, clip_grad=None, loss_fn=None, training_step=None, wrapped=net,
    ...     state=TrainingState(global_step=3), sums=EpochSums(), device="cpu", log_every=50)
    >>> payload = TrainerPayload(steps, LrScaling(None), None).build([], {})
    >>> payload["global_step"], payload["lr_factor"], payload["scaler"]
    (3, 1.0, None)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import devlayer
from devlayer.train.elastic import apply_world_change, data_position, same_plan
from devlayer.train.lr_scaling import LrScaling
from devlayer.train.steps import OptimizerSteps

__all__ = ["TrainerPayload"]


class TrainerPayload:
    """A checkpoint's Trainer entries (beside the strategy's model and optimizer entries).

    Args:
        steps: The loop's :class:`~devlayer.train.steps.OptimizerSteps`: its position and
            running sums, its precision (the fp16 loss scaler), its optimizer (whose rates
            are rescaled to this run's factor) and its LR scheduler.
        lr_scale: The learning-rate factor the optimizer's rates carry.
        early_stopping: The :class:`~devlayer.train.callbacks.EarlyStopping`, or ``None``.
        seed: The run's seed (part of the saved data position).
        trainer: The :class:`~devlayer.train.trainer.Trainer` whose ``plan`` (the batch plan)
            is saved with the data position, and which a resume at another world size
            changes (:func:`~devlayer.train.elastic.apply_world_change`); ``None``: neither.
    """

    def __init__(
        self,
        steps: OptimizerSteps,
        lr_scale: LrScaling,
        early_stopping: Any,
        *,
        seed: int = 0,
        trainer: Any = None,
    ) -> None:
        self.state, self.sums, self.lr_scale = steps.state, steps.sums, lr_scale
        self.precision, self.optimizer = steps.precision, steps.optimizer
        self.scheduler, self.early_stopping = steps.scheduler, early_stopping
        self.seed, self.trainer = seed, trainer

    def build(self, ranks: list[Any], states: Mapping[str, Any]) -> dict[str, Any]:
        """The payload around every rank's entry (``ranks``) and the strategy's ``states``."""
        stopper = self.early_stopping
        plan = self.trainer.plan if self.trainer is not None else None
        st = self.state
        return {
            **states,
            "scaler": self.precision.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            **self.state.position(),
            "early_stopping": stopper.state_dict() if stopper is not None else None,
            "ranks": ranks,
            "lr_factor": self.lr_scale.factor,
            # Where the epoch stands over all ranks: a resume at any world size continues it.
            "data": plan and data_position(self.seed, st.epoch, st.batches_done, plan),
        }

    def apply(self, payload: Mapping[str, Any], same_world: bool) -> None:
        """Restore the Trainer's entries (the strategy restored model and optimizer). At
        another world size (or batch plan) the global batch is kept and the epoch continues
        at its global position (:func:`~devlayer.train.elastic.apply_world_change`)."""
        from devlayer.train.checkpoint import set_rng_state

        # Saved with another world size under lr_scaling: the optimizer state carries the
        # old scaled rates; rescale them to this run's factor.
        self.lr_scale.rescale(self.optimizer, float(payload.get("lr_factor", 1.0)))
        self.precision.load_state_dict(payload.get("scaler"))
        if self.scheduler is not None and payload.get("scheduler") is not None:
            self.scheduler.load_state_dict(payload["scheduler"])
        if self.early_stopping is not None and payload.get("early_stopping") is not None:
            self.early_stopping.load_state_dict(payload["early_stopping"])
        plan = self.trainer.plan if self.trainer is not None else None
        same = same_world and same_plan(payload, plan)
        self.state.restore(payload, same_world=same)
        if same:
            mine = payload["ranks"][devlayer.rank()]
            set_rng_state(mine["rng"])
            self.sums.restore(mine)
        elif self.trainer is not None:
            apply_world_change(self.trainer, payload)
