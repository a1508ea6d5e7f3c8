"""Trainer(strategy=...) jobs for the FSDP Trainer tests, run on 1 or 2 gloo ranks."""

from __future__ import annotations

from typing import Any

import torch

import devlayer
from devlayer.train import Callback, EarlyStopping
from devlayer.train.fsdp import full_state_dict, local_numel
from tests.dist.trainer_worker import make_data, make_model
from tests.helpers import toy_trainer


class LossLog(Callback):
    """Records every micro-batch loss; optionally puts an inf into some ranks' gradient."""

    def __init__(self, inf_at_step: int | None = None, inf_ranks: tuple[int, ...] = ()) -> None:
        self.losses: list[float] = []
        self.inf_at_step, self.inf_ranks = inf_at_step, inf_ranks

    def on_train_batch_end(self, trainer: Any, loss: Any) -> None:
        self.losses.append(float(loss.item()))
        # After backward, before the optimizer step: an inf in this rank's shard only.
        if trainer.state.global_step == self.inf_at_step and devlayer.rank() in self.inf_ranks:
            grad = next(p.grad for p in trainer.wrapped_model.parameters() if p.grad is not None)
            local = grad.to_local() if hasattr(grad, "to_local") else grad
            local.view(-1)[0] = float("inf")


def fit(
    strategy: str,
    *,
    max_epochs: int | None = 2,
    max_steps: int | None = None,
    grad_accum: int = 1,
    clip_grad: float | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int | None = None,
    resume: str | None = "auto",
    allow_world_size_change: bool = False,
    precision: str | None = None,
    export: str | None = None,
    val_samples: int = 48,
    batch_size: int = 16,
    inf_at_step: int | None = None,
    inf_ranks: tuple[int, ...] = (),
    early_stop: bool = False,
    export_on_main_only: bool = False,
) -> dict[str, Any]:
    """Fit the small regression of trainer_worker; return per-step losses and the weights."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)  # state worth sharding
    losses = LossLog(inf_at_step, inf_ranks)
    trainer = toy_trainer(
        model,
        opt,
        strategy=strategy,
        batch_size=batch_size,
        grad_accum=grad_accum,
        clip_grad=clip_grad,
        max_epochs=max_epochs,
        max_steps=max_steps,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        resume=resume,
        allow_world_size_change=allow_world_size_change,
        precision=precision,
        callbacks=[losses],
        # min_delta so large that no epoch improves: stop after the second epoch.
        early_stopping=EarlyStopping("val_loss", patience=1, min_delta=1e9) if early_stop else None,
        seed=7,
    )
    history = trainer.fit(make_data(), make_data(val_samples, seed=1) if val_samples else None)
    weights = full_state_dict(trainer.wrapped_model)  # collective under FSDP; rank 0 gets it
    on_this_rank = export and (devlayer.is_main() or not export_on_main_only)
    exported = trainer.export(export) if on_this_rank else None
    with torch.no_grad():
        probe = trainer.wrapped_model(torch.linspace(-1, 1, 20).reshape(5, 4)).float()
    return {
        "rank": devlayer.rank(),
        "losses": losses.losses,
        "history": history,
        "global_step": trainer.state.global_step,
        "stop_reason": trainer.stop_reason,
        "resumed_from": str(trainer.resumed_from) if trainer.resumed_from else None,
        "weights": weights,
        "local": local_numel(trainer.wrapped_model),
        "total": sum(p.numel() for p in make_model().parameters()),
        "param_type": type(next(trainer.wrapped_model.parameters())).__name__,
        "exported": str(exported) if exported else None,
        "probe": probe.tolist(),
        "scale": trainer.scaler.get_scale() if trainer.scaler is not None else None,
    }
