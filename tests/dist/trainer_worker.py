"""Training jobs run by the Trainer tests on 1 or 2 gloo ranks (importable for spawn)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

import devlayer
from tests.helpers import toy_trainer


def make_data(n: int = 96, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 4, generator=g) * 2 - 1
    y = (x @ torch.tensor([[1.5], [-2.0], [0.5], [1.0]]) + 0.3).squeeze(1)
    return TensorDataset(x, y.unsqueeze(1))


def make_model() -> torch.nn.Module:
    torch.manual_seed(1234)  # identical initial weights on every rank and run
    return torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Dropout(0.1), torch.nn.Linear(16, 1)
    )


def full_set_loss(
    weights: dict[str, torch.Tensor], data: TensorDataset, model: torch.nn.Module | None = None
) -> float:
    """The exact mean squared error of ``model`` (default ``make_model()``) with ``weights``
    over all of ``data``."""
    model = make_model() if model is None else model
    model.load_state_dict(weights)
    model.eval()
    x, y = data.tensors
    with torch.no_grad():
        return float(((model(x).double() - y.double()) ** 2).mean())


def train(
    *,
    max_epochs: int | None = 3,
    batch_size: int = 16,
    grad_accum: int = 1,
    max_steps: int | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int | None = None,
    metrics_file: str | None = None,
    lr: float = 0.05,
    resume: str | None = "auto",
    val: bool = True,
    allow_world_size_change: bool = False,
    progress: bool = False,
    early_stopping: dict[str, Any] | None = None,
    checkpoint_async: bool = False,
    strategy: str = "ddp",
    callbacks: tuple[Any, ...] = (),
) -> dict[str, Any]:
    """Fit the small regression; return weights, history, the rank and what it printed.

    ``early_stopping``: the keyword arguments of an ``EarlyStopping`` (None: no early stop).
    """
    import contextlib
    import io

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.9)
    trainer = toy_trainer(
        model,
        opt,
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_epochs=max_epochs,
        max_steps=max_steps,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        checkpoint_async=checkpoint_async,
        strategy=strategy,
        callbacks=callbacks,
        metrics_file=metrics_file,
        resume=resume,
        allow_world_size_change=allow_world_size_change,
        scheduler=sched,
        progress=progress,
        seed=7,
        early_stopping=(
            devlayer.train.EarlyStopping(**early_stopping) if early_stopping is not None else None
        ),
    )
    with contextlib.redirect_stdout(io.StringIO()) as out:
        history = trainer.fit(make_data(), make_data(48, seed=1) if val else None)
    return {
        "stdout": out.getvalue(),
        "stop_reason": getattr(trainer, "stop_reason", None),
        "stopped_early": trainer.stopped_early,
        "global_step": trainer.state.global_step,
        "rank": devlayer.rank(),
        "weights": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "history": history,
        "resumed_from": str(trainer.resumed_from) if trainer.resumed_from else None,
        "initialized_after_fit": devlayer.is_initialized(),
    }


def train_then_resume(
    checkpoint_dir: str, stop_after: int, final_max_steps: int | None = None, **kw: Any
) -> dict[str, Any]:
    """Run until ``stop_after`` optimizer steps (a checkpoint is written), then resume."""
    train(checkpoint_dir=checkpoint_dir, checkpoint_every=2, max_steps=stop_after, **kw)
    assert any(Path(checkpoint_dir).iterdir())
    return train(checkpoint_dir=checkpoint_dir, checkpoint_every=2, max_steps=final_max_steps, **kw)


def train_with_failing_second_save(checkpoint_dir: str) -> str:
    """Rank 0's second checkpoint write hits ENOSPC; return the error every rank sees."""
    import errno
    import os

    from devlayer.train import checkpoint

    if devlayer.rank() == 0:
        real_fsync, calls = os.fsync, {"saves": 0}

        def before_commit(path: Path) -> None:
            calls["saves"] += 1

        def failing_fsync(fd: int) -> None:
            if calls["saves"] >= 1:  # the first checkpoint is complete; fail the next one
                raise OSError(errno.ENOSPC, "No space left on device")
            real_fsync(fd)

        checkpoint._before_commit = before_commit
        checkpoint.os.fsync = failing_fsync  # type: ignore[attr-defined]
    try:
        train(checkpoint_dir=checkpoint_dir, checkpoint_every=2, max_epochs=1, val=False)
    except devlayer.train.CheckpointError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def seeds_and_writers(checkpoint_dir: str) -> dict[str, Any]:
    """D2 and C8: what each rank draws after seeding, and which ranks wrote checkpoints."""
    from devlayer.train import checkpoint

    writers: list[int] = []
    real_save = checkpoint.CheckpointStore.save

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        writers.append(devlayer.rank())
        return real_save(self, *args, **kwargs)

    checkpoint.CheckpointStore.save = spy  # type: ignore[method-assign]
    devlayer.train.seed_everything(5)
    draw = torch.rand(3).tolist()
    loader = devlayer.prepare_loader(make_data(32), 8, num_workers=0, seed=5)
    first_batch = next(iter(loader))[0].flatten().tolist()
    base_seed = torch.empty((), dtype=torch.int64).random_(generator=loader.loader.generator)
    train(checkpoint_dir=checkpoint_dir, checkpoint_every=2, max_epochs=1, val=False)
    return {
        "draw": draw,
        "first": first_batch,
        "writers": writers,
        "worker_base_seed": int(base_seed),
    }


def preempt_one_rank(
    checkpoint_dir: str, check_every: int, strategy: str = "ddp"
) -> dict[str, Any]:
    """Only rank 1 gets SIGTERM (after step 3); every rank must stop at the same step."""
    import os
    import signal

    class TermRankOne(devlayer.train.Callback):
        def on_train_batch_end(self, trainer: Any, loss: Any) -> None:
            if (
                devlayer.rank() == 1
                and trainer.state.global_step == 3
                and trainer.preemption.signal is None
            ):
                os.kill(os.getpid(), signal.SIGTERM)

    model = make_model()
    trainer = toy_trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05),
        batch_size=16,
        max_epochs=3,
        checkpoint_dir=checkpoint_dir,
        preempt_check_every=check_every,
        strategy=strategy,
        callbacks=[TermRankOne()],
        resume=None,
    )
    try:
        trainer.fit(make_data())
    except devlayer.train.PreemptedError as exc:
        return {"step": trainer.state.global_step, "error": str(exc)}
    return {"step": trainer.state.global_step, "error": None}


# ---------------------------------------------------------------- issue 13: guard tests


def _linear_trainer(data_seed: int = 0, **kw: Any) -> tuple[Any, torch.nn.Module]:
    """A dropout-free model: runs on 1 and 2 ranks see the same global batches."""
    torch.manual_seed(99)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = toy_trainer(
        model,
        opt,
        resume=None,
        seed=3,
        **kw,
    )
    return trainer, model


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def count_gradient_allreduces(grad_accum: int) -> dict[str, Any]:
    """Gradient all-reduces (DDP comm-hook calls) after each micro-batch of one epoch."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    calls = {"n": 0}

    def counting_hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP checks annotations
        calls["n"] += 1
        return default_hooks.allreduce_hook(state, bucket)

    per_batch: list[int] = []

    class Count(devlayer.train.Callback):
        def on_fit_start(self, trainer: Any) -> None:
            trainer.wrapped_model.register_comm_hook(None, counting_hook)

        def on_train_batch_end(self, trainer: Any, loss: Any) -> None:
            per_batch.append(calls["n"] - sum(per_batch))

    trainer, _ = _linear_trainer(
        batch_size=16, grad_accum=grad_accum, max_epochs=1, callbacks=[Count()]
    )
    trainer.fit(make_data())
    return {"per_batch": per_batch, "steps": trainer.state.global_step, "total": calls["n"]}


def lr_scaling_run(mode: str | None, lr: float) -> dict[str, Any]:
    """Two epochs with a LambdaLR (recomputed from base_lrs each step) under ``lr_scaling``."""
    torch.manual_seed(99)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    trainer = toy_trainer(
        model,
        opt,
        batch_size=16,
        max_epochs=2,
        lr_scaling=mode,
        scheduler=sched,
        resume=None,
        seed=3,
    )
    history = trainer.fit(make_data())
    return {
        "lrs": [h["lr"] for h in history],
        "group_lr": opt.param_groups[0]["lr"],
        "weights": _weights(model),
    }


def short_last_window(grad_accum: int) -> dict[str, Any]:
    """12 samples, global batch 8: on 2 ranks that is 3 micro-batches of 2 at grad_accum=2."""
    trainer, model = _linear_trainer(batch_size=8, grad_accum=grad_accum, max_epochs=2)
    history = trainer.fit(make_data(12))
    return {"steps": [h["global_step"] for h in history], "weights": _weights(model)}


def odd_validation_set() -> dict[str, Any]:
    """Validation on 7 samples over 2 ranks (4 + 3, in micro-batches of 2): the weighting."""
    trainer, model = _linear_trainer(batch_size=4, max_epochs=1)
    history = trainer.fit(make_data(16), make_data(7, seed=5))
    return {"val_loss": history[-1]["val_loss"], "weights": _weights(model)}
