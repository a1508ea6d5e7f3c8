"""The Trainer's arguments checked before anything runs: the value, what to pass instead.

Every argument of :class:`~devlayer.train.trainer.Trainer` has a check in :data:`CHECKS`
(type and range, pure: no process group, no file touched); :func:`check_options` runs them
all, then the rules between arguments. The checks :meth:`Trainer.fit` needs at run time
(:func:`check_optimizer_params`, :func:`check_batches`, :func:`check_loss`) live here too.

Example:
    >>> positive("grad_accum", 0)
    Traceback (most recent call last):
    ...
    devlayer.errors.InvalidArgumentError: grad_accum=0 must be an int >= 1
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from devlayer.errors import InvalidArgumentError
from devlayer.train.callbacks import Callback, EarlyStopping, is_finite_number
from devlayer.train.compile import compile_options
from devlayer.train.data import MAX_BATCH_SIZE, check_num_workers
from devlayer.train.fsdp import shard_model
from devlayer.train.loggers import check_loggers
from devlayer.train.precision import resolve_precision
from devlayer.train.progress import resolve_progress_interval
from devlayer.train.strategy import from_name

__all__ = [
    "CHECKS",
    "MAX_BATCH_SIZE",
    "MAX_SEED",
    "callback_list",
    "check_batches",
    "check_loss",
    "check_metrics",
    "check_optimizer_params",
    "check_options",
    "positive",
]

#: Seeds are below 2**63: torch's generators take ``seed + epoch`` as a 64-bit integer.
MAX_SEED = 2**63 - 1


def positive(name: str, value: Any) -> None:
    """``value`` is an int >= 1 (a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(f"{name}={_short(value)} must be an int >= 1")


def _optional(check: Callable[[str, Any], None]) -> Callable[[str, Any], None]:
    """``check``, with ``None`` accepted."""

    def optional(name: str, value: Any) -> None:
        if value is not None:
            check(name, value)

    return optional


def _positive_number(name: str, value: Any) -> None:
    """A finite real number > 0 (a bool, a numeric string or an int past float is not)."""
    if not (is_finite_number(value) and value > 0):
        raise InvalidArgumentError(f"{name}={_short(value)} must be a positive finite number")


def _batch_size(name: str, value: Any) -> None:
    positive(name, value)
    if value > MAX_BATCH_SIZE:
        raise InvalidArgumentError(
            f"{name}={_short(value)} is larger than any DataLoader can slice (at most 2**63-1); "
            "pass the global number of samples per optimizer step"
        )


def _seed(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise InvalidArgumentError(
            f"{name}={_short(value)} must be an int >= 0 and < 2**63 (torch's generators "
            f"are seeded with seed + epoch as a 64-bit integer), e.g. {name}=0"
        )


def _flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"{name}={_short(value)} must be True or False")


def _world_size_change(name: str, value: Any) -> None:
    if not (isinstance(value, bool) or value == "rescale_lr"):
        raise InvalidArgumentError(
            f"{name}={_short(value)} must be True, False or 'rescale_lr' (keep the per-rank "
            "batch and scale the learning rate with the global batch)"
        )


def _callable(name: str, value: Any) -> None:
    if not callable(value):
        raise InvalidArgumentError(
            f"{name}={_short(value)} must be callable (a function or a torch.nn.Module) or None"
        )


def _path(name: str, value: Any) -> None:
    """A non-empty ``str`` or ``os.PathLike`` (``""`` would mean the working directory)."""
    text = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(text, str):
        raise InvalidArgumentError(f"{name}={_short(value)} must be a path (str or os.PathLike)")
    if not text.strip():
        raise InvalidArgumentError(
            f"{name}={_short(value)} is an empty path, which would write into the working "
            f"directory; name a folder or file, e.g. {name}='runs/exp1'"
        )


def _resume(name: str, value: Any) -> None:
    if value is None or value == "auto":
        return
    try:
        _path(name, value)
    except InvalidArgumentError:
        raise InvalidArgumentError(
            f"{name}={_short(value)}: use 'auto' (the newest checkpoint in checkpoint_dir), a "
            "checkpoint's path (str or os.PathLike), or None for a fresh run"
        ) from None


def _module(name: str, value: Any) -> None:
    import torch

    if not isinstance(value, torch.nn.Module):
        raise InvalidArgumentError(
            f"{name}={_short(value)} is a {type(value).__name__}; expected a torch.nn.Module"
        )


def _optimizer(name: str, value: Any) -> None:
    groups = getattr(value, "param_groups", None)
    steps = all(callable(getattr(value, m, None)) for m in ("step", "zero_grad", "state_dict"))
    if not (isinstance(groups, list) and steps):
        raise InvalidArgumentError(
            f"{name}={_short(value)} is not an optimizer (no param_groups, step, zero_grad, "
            f"state_dict); pass one built on the model, e.g. "
            f"torch.optim.AdamW(model.parameters(), lr=1e-3)"
        )


def _scheduler(name: str, value: Any) -> None:
    methods = ("step", "state_dict", "load_state_dict")
    if not all(callable(getattr(value, m, None)) for m in methods):
        raise InvalidArgumentError(
            f"{name}={_short(value)} is not an LR scheduler (step, state_dict, "
            "load_state_dict); pass one built on the optimizer, e.g. "
            "torch.optim.lr_scheduler.StepLR(optimizer, 10), or None"
        )


def _early_stopping(name: str, value: Any) -> None:
    if not isinstance(value, EarlyStopping):
        raise InvalidArgumentError(
            f"{name}={_short(value)} is a {type(value).__name__}; pass "
            f"devlayer.train.EarlyStopping(monitor=..., ...) or None"
        )


def _lr_scaling(name: str, value: Any) -> None:
    if value not in (None, "linear", "sqrt"):
        raise InvalidArgumentError(f"{name}={_short(value)}: use 'linear', 'sqrt' or None")


def _optimize(name: str, value: Any) -> None:
    if value is not None and not (isinstance(value, str) or callable(value)):
        raise InvalidArgumentError(
            f"{name}={_short(value)}: use the name of a registered optimization "
            f"(devlayer.train.optimize.optimization_names()), a callable (model, optimizer) "
            f"-> (model, optimizer), or None"
        )


def _strategy(name: str, value: Any) -> None:
    from_name(value)  # a known name or a Strategy object


#: shard_model's options a Trainer passes on (its precision comes from ``precision=``).
FSDP_OPTIONS = tuple(p for p in inspect.signature(shard_model).parameters if p != "model")


def _fsdp(name: str, value: Any) -> None:
    if not isinstance(value, Mapping):
        raise InvalidArgumentError(
            f"{name}={_short(value)} must be a dict of shard_model options "
            f"({', '.join(o for o in FSDP_OPTIONS if o != 'precision')}) or None"
        )
    unknown = [k for k in value if k not in FSDP_OPTIONS]
    if unknown:
        raise InvalidArgumentError(
            f"{name}={_short(dict(value))}: unknown option(s) {unknown}; use "
            f"{', '.join(o for o in FSDP_OPTIONS if o != 'precision')}"
        )


def _precision(name: str, value: Any) -> None:
    if value is not None:
        resolve_precision(value)


def _progress_interval(name: str, value: Any) -> None:
    if value is not None:
        resolve_progress_interval(value)


def _num_workers(name: str, value: Any) -> None:
    # Before init the local ranks are unknown: bound by the process's CPUs here; fit()
    # (prepare_loader) applies the per-rank bound.
    check_num_workers(value, local_world_size=1)


def _compile(name: str, value: Any) -> None:
    compile_options(value)


#: One check per Trainer argument: ``check(name, value)`` raises InvalidArgumentError.
#: ``callbacks`` is read once by :func:`callback_list` instead (it may be a generator).
CHECKS: dict[str, Callable[[str, Any], None]] = {
    "model": _module,
    "optimizer": _optimizer,
    "loss_fn": _optional(_callable),
    "precision": _precision,
    "grad_accum": positive,
    "clip_grad": _optional(_positive_number),
    "max_epochs": _optional(positive),
    "max_steps": _optional(positive),
    "batch_size": _optional(_batch_size),
    "lr_scaling": _lr_scaling,
    "checkpoint_dir": _optional(_path),
    "checkpoint_every": _optional(positive),
    "checkpoint_async": _flag,
    "resume": _resume,
    "seed": _seed,
    "early_stopping": _optional(_early_stopping),
    "metrics_file": _optional(_path),
    "loggers": check_loggers,
    "progress": _flag,
    "progress_interval": _progress_interval,
    "training_step": _optional(_callable),
    "validation_step": _optional(_callable),
    "scheduler": _optional(_scheduler),
    "num_workers": _num_workers,
    "log_every": positive,
    "reference_throughput": _optional(_positive_number),
    "allow_world_size_change": _world_size_change,
    "preempt_check_every": positive,
    "optimize": _optimize,
    "strategy": _strategy,
    "fsdp": _optional(_fsdp),
    "compile": _compile,
}


def check_options(args: Mapping[str, Any]) -> None:
    """Refuse Trainer arguments that cannot work, naming the value and what to pass instead.

    Args:
        args: The Trainer's arguments by name (``callbacks`` is checked by
            :func:`callback_list`).

    Raises:
        InvalidArgumentError: The first bad argument: its name, the value, the fix.
    """
    for name, check in CHECKS.items():
        if name in args:
            check(name, args[name])
    if args.get("checkpoint_every") is not None and args.get("checkpoint_dir") is None:
        raise InvalidArgumentError("checkpoint_every needs checkpoint_dir")
    if args.get("checkpoint_async") and args.get("checkpoint_dir") is None:
        raise InvalidArgumentError(
            "checkpoint_async=True needs checkpoint_dir (the folder it writes into)"
        )
    _check_resume_folder(args.get("resume"), args.get("checkpoint_dir"))
    # strategy, fsdp and precision together: checked once, by the strategy's from_name.
    from_name(args["strategy"], fsdp=args.get("fsdp"), trainer=True)
    if args.get("loss_fn") is None and args.get("training_step") is None:
        raise InvalidArgumentError(
            "Trainer needs loss_fn (called as loss_fn(model(x), y)) or training_step"
        )


def _check_resume_folder(resume: Any, checkpoint_dir: Any) -> None:
    """A checkpoint path to resume needs the folder the Trainer keeps checkpoints in."""
    if resume is None or resume == "auto" or checkpoint_dir is not None:
        return
    parent = Path(resume).parent
    raise InvalidArgumentError(
        f"resume={os.fspath(resume)!r} names a checkpoint, but checkpoint_dir=None: the "
        "Trainer resumes through its checkpoint folder (lock, run identity) and keeps "
        f"saving there; pass checkpoint_dir={os.fspath(parent)!r} (the folder that holds "
        "it), or resume=None to train from scratch"
    )


def callback_list(callbacks: Any) -> list[Callback]:
    """``callbacks`` read once into a list of :class:`Callback` instances.

    Raises:
        InvalidArgumentError: ``callbacks`` is not an iterable (``None``, a str), or an item
            is not a Callback; the message names its position and type.
    """
    if isinstance(callbacks, (str, bytes, Mapping)) or not isinstance(callbacks, Iterable):
        raise InvalidArgumentError(
            f"callbacks={_short(callbacks)} must be a list of devlayer.train.Callback "
            "objects (empty: callbacks=())"
        )
    found = list(callbacks)
    for i, cb in enumerate(found):
        if not isinstance(cb, Callback):
            raise InvalidArgumentError(
                f"callbacks={_short(found)}: callbacks[{i}] is a {type(cb).__name__}, not a "
                "devlayer.train.Callback; subclass Callback and override its on_* methods"
            )
    return found


def check_optimizer_params(model: Any, optimizer: Any) -> None:
    """The optimizer holds at least one of the model's trainable parameters.

    An optimizer built on another model's parameters steps those and leaves this model
    bitwise unchanged, epoch after epoch. An optimizer over part of the model (a head being
    fine-tuned) is accepted.

    Raises:
        InvalidArgumentError: The model has trainable parameters and the optimizer holds
            none of them; the message gives both counts.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    mine = sum(id(p) in held for p in trainable)
    if trainable and not mine:
        raise InvalidArgumentError(
            f"optimizer={_short(optimizer)} holds 0 of the model's {len(trainable)} "
            f"trainable parameters (it holds {len(held)} other tensor(s)), so training would "
            "leave the model unchanged; build it from this model, e.g. "
            "torch.optim.SGD(model.parameters(), lr=0.1)"
        )


def check_batches(n_batches: int, rank: int, max_steps: int | None) -> None:
    """``train_data`` gives at least one batch per epoch on this rank.

    Raises:
        InvalidArgumentError: No batch: an empty dataset (or one smaller than a batch with
            ``drop_last``) would train nothing, or never reach ``max_steps``.
    """
    if n_batches > 0:
        return
    never = f", and max_steps={max_steps} could never be reached" if max_steps else ""
    raise InvalidArgumentError(
        f"train_data gives 0 batches per epoch on rank {rank}, so fit() would train "
        f"nothing{never}; pass a dataset with samples (at least one batch per rank)"
    )


def check_loss(loss: Any, source: str) -> Any:
    """``loss`` is a one-element floating tensor (what ``backward()`` needs); returns it.

    Args:
        loss: What ``training_step`` or ``loss_fn`` returned.
        source: Its name, for the message.

    Raises:
        InvalidArgumentError: Anything else, named with its type (and shape).
    """
    import torch

    if isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.is_floating_point():
        return loss
    if isinstance(loss, torch.Tensor):
        seen = f"a {loss.dtype} tensor of shape {tuple(loss.shape)}"
    else:
        seen = "None" if loss is None else f"a {type(loss).__name__} ({_short(loss)})"
    raise InvalidArgumentError(
        f"{source} returned {seen}; it must return the loss as a one-element float tensor "
        "(e.g. torch.nn.functional.mse_loss(model(x), y), or a .mean() of per-sample losses)"
    )


def check_metrics(values: Any, source: str) -> dict[str, Any]:
    """``values`` is a dict of per-batch metrics: str keys, numbers or one-element tensors.

    Args:
        values: What ``validation_step`` returned.
        source: Its name, for the message.

    Returns:
        ``values`` as a dict.

    Raises:
        InvalidArgumentError: Not a mapping, or a key or value of another kind (named).
    """
    import torch

    if not isinstance(values, Mapping):
        raise InvalidArgumentError(
            f"{source} returned a {type(values).__name__} ({_short(values)}); it must "
            "return a dict of per-batch means, e.g. {'val_loss': loss, 'val_accuracy': acc}"
        )
    for key, value in values.items():
        number = isinstance(value, (int, float))
        scalar = isinstance(value, torch.Tensor) and value.numel() == 1
        if not isinstance(key, str) or not (number or scalar):
            raise InvalidArgumentError(
                f"{source} returned {{{_short(key)}: {_short(value)}}}; each entry must map "
                "a metric name (str) to a number or a one-element tensor (a per-batch mean)"
            )
    return dict(values)


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (an int too long to print: its size).

    Example:
        >>> _short(10**5000)
        'an int of 16610 bits'
    """
    try:
        text = repr(value)
    except ValueError:  # int repr is limited to 4300 digits (sys.set_int_max_str_digits)
        return f"an int of {value.bit_length()} bits"
    return text if len(text) <= limit else text[: limit - 3] + "..."
