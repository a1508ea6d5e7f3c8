"""How the model is distributed: one object per strategy (one process, DDP, FSDP).

A strategy owns everything that changes together when the distribution changes: wrapping
the model (and pointing the optimizer at it), gradient accumulation (``no_sync`` or its
FSDP equivalent), the precision policy, the model and optimizer state in checkpoints, the
full state for ``export`` and the validation forwards. The Trainer calls these methods and
never asks which strategy it holds, so a new one (HSDP, DDP with a gradient compression
hook, later tensor parallel) is one subclass, passed as ``Trainer(strategy=MyStrategy())``.

The checkpoint state is built on ``torch.distributed.checkpoint.state_dict``
(``get_state_dict`` / ``set_state_dict``, see :mod:`devlayer.train.sharded`), whatever
wraps the model, as torchtitan's checkpointer does. A replicated model keeps its state in
the checkpoint's payload (keys as ``model.state_dict()`` names them); a sharded one writes
DCP shards (every rank its own), which any strategy can read.

Example:
    >>> from_name("ddp").name
    'ddp'
    >>> from_name("zero3")
    Traceback (most recent call last):
    ...
    devlayer.errors.InvalidArgumentError: strategy='zero3': use 'ddp' or 'fsdp', or pass a ...
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import devlayer
from devlayer.config import short_repr
from devlayer.errors import InvalidArgumentError
from devlayer.train.commhooks import record_ddp
from devlayer.train.errors import CheckpointError
from devlayer.train.fsdp import (
    full_state_dict,
    parameter_names,
    rebind_optimizer,
    shard_model,
    skip_grad_sync,
)
from devlayer.train.precision import Precision, ShardedGradScaler
from devlayer.train.sharded import (
    SHARDS_DIR,
    background_group,
    read_shards,
    restore_state,
    shard_stager,
    training_state,
    write_shards,
    write_shards_async,
)

__all__ = [
    "DDP_DEFAULTS",
    "DDPStrategy",
    "FSDPStrategy",
    "SingleProcessStrategy",
    "Strategy",
    "from_name",
    "unwrap",
]

#: Defaults devlayer passes to DistributedDataParallel (each can be overridden):
#: ``gradient_as_bucket_view`` lets gradients live in DDP's communication buckets, which
#: saves one gradient-sized copy per step and memory.
DDP_DEFAULTS: dict[str, Any] = {"gradient_as_bucket_view": True}


def unwrap(model: Any) -> Any:
    """The user's module inside a DDP (or compiled) wrapper; an FSDP model is its own."""
    inner = getattr(model, "module", model)
    return getattr(inner, "_orig_mod", inner)


class Strategy:
    """How the model is distributed; one method per concern the Trainer delegates.

    The defaults are those of one process holding the whole model: no wrapper, no
    collective, the state in the checkpoint's payload. Subclass it (or
    :class:`DDPStrategy`) and override what differs.

    Attributes:
        name: A short name for messages (``"ddp"``).
        collective_export: ``export()`` gathers the model: every rank must call it.
    """

    name: str = "single"
    collective_export: bool = False

    def precision(self, precision: str, device: Any) -> Precision:
        """The run's precision policy (autocast dtype, fp16 scaler) on ``device``."""
        return Precision(precision, device)

    def wrap(self, model: Any, optimizer: Any = None, precision: Precision | None = None) -> Any:
        """Move ``model`` to :func:`devlayer.device` and wrap it; ``optimizer`` follows.

        Args:
            model: The user's ``torch.nn.Module`` (moved in place).
            optimizer: Built over ``model``'s parameters (``None`` outside the Trainer).
            precision: The Trainer's precision (from :meth:`precision`), for strategies
                whose wrapper casts (``None`` outside the Trainer).

        Returns:
            The model to train: a wrapper around ``model``, or ``model`` itself.
        """
        model.to(devlayer.device())
        return model

    def accumulating(self, model: Any) -> contextlib.AbstractContextManager[Any]:
        """A block whose backward keeps gradients local (not the last micro-batch)."""
        return skip_grad_sync(model)

    def validation_model(self, model: Any) -> Any:
        """The module validation forwards run on (no DDP: ranks may see other counts)."""
        return unwrap(model)

    def validation_fillers(self, batches: int) -> int:
        """Forwards this rank runs after its last validation batch (0: none needed)."""
        return 0

    def save_state(
        self, model: Any, optimizer: Any, new_folder: Callable[[], Path]
    ) -> tuple[dict[str, Any], Path | None]:
        """Model and optimizer state for a checkpoint (every rank calls it).

        Args:
            model: The wrapped model.
            optimizer: Its optimizer.
            new_folder: Creates the checkpoint's temporary folder (called on rank 0 only,
                by strategies that write files of their own).

        Returns:
            The payload's ``"model"`` and ``"optimizer"`` entries, and the temporary folder
            already holding this strategy's files (``None``: none written).
        """
        model_state, optimizer_state = training_state(model, optimizer)
        return {"model": model_state, "optimizer": optimizer_state}, None

    def background_state(
        self, model: Any, optimizer: Any, new_folder: Callable[[], Path]
    ) -> tuple[dict[str, Any], Path | None, Callable[[], None] | None]:
        """Model and optimizer state for a background save (every rank calls it).

        Args:
            model: The wrapped model.
            optimizer: Its optimizer.
            new_folder: Creates the checkpoint's temporary folder (rank 0 only).

        Returns:
            The payload's ``"model"`` and ``"optimizer"`` entries (live: the caller stages
            them; ``{}`` on ranks other than 0, which write no payload), the temporary
            folder other writers fill (``None``: none), and this rank's own background
            write, run in the writer thread (``None``: none). The replicas' state is all in
            rank 0's payload.
        """
        model_state, optimizer_state = training_state(model, optimizer)
        if not devlayer.is_main():
            return {}, None, None
        return {"model": model_state, "optimizer": optimizer_state}, None, None

    def release_staging(self) -> None:
        """Free memory kept between background saves (at the end of ``fit()``)."""

    def load_state(
        self, model: Any, optimizer: Any, payload: Mapping[str, Any], path: Path, shards: Any
    ) -> None:
        """Restore model and optimizer from checkpoint ``path`` (every rank calls it).

        Args:
            model: The wrapped model.
            optimizer: Its optimizer.
            payload: The checkpoint's verified payload.
            path: The checkpoint folder.
            shards: The manifest's ``"shards"`` record (``None``: no shards, the state is
                in the payload). Sharded checkpoints load at any world size.
        """
        if shards is not None:
            read_shards(
                path / SHARDS_DIR,
                list(shards),
                unwrap(model),
                optimizer,
                world_size=devlayer.world_size(),
            )
            return
        restore_state(model, optimizer, payload["model"], payload["optimizer"])

    def full_state(self, model: Any) -> dict[str, Any]:
        """The plain model's whole ``state_dict`` on CPU, for ``export`` (rank 0's)."""
        return full_state_dict(model)


class SingleProcessStrategy(Strategy):
    """One process, the whole model, no wrapper: what DDP is at world size 1."""


class DDPStrategy(Strategy):
    """Replicas: ``DistributedDataParallel`` at world size > 1, the plain model at 1.

    Args:
        **ddp_kwargs: Passed to ``DistributedDataParallel`` on top of
            :data:`DDP_DEFAULTS` (``device_ids`` is set for indexed
            accelerators only).
    """

    name = "ddp"

    def __init__(self, **ddp_kwargs: Any) -> None:
        self.ddp_kwargs = ddp_kwargs

    def wrap(self, model: Any, optimizer: Any = None, precision: Precision | None = None) -> Any:
        """DDP around ``model`` on its device (``model`` itself at world size 1).

        With hang reports on, its gradient buckets are recorded in the collective ledger
        (:func:`~devlayer.train.commhooks.record_ddp`); a model that is already DDP is
        returned as it is, unrecorded.
        """
        st = devlayer.state()
        model.to(st.device)
        if st.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(model, DistributedDataParallel):
            return model
        kwargs = {**DDP_DEFAULTS, **self.ddp_kwargs}
        if st.device_index is not None:
            kwargs.setdefault("device_ids", [st.device_index])
            kwargs.setdefault("output_device", st.device_index)
        wrapped = DistributedDataParallel(model, **kwargs)
        if st.settings.hang_reports and st.settings.ddp_ledger:
            record_ddp(wrapped)  # its gradient buckets in the ledger (hang reports)
        return wrapped


class FSDPStrategy(Strategy):
    """Shards (FSDP2): parameters, gradients and optimizer state split over the ranks.

    ``precision`` becomes FSDP's mixed-precision policy (no autocast; fp16 scales with a
    :class:`~devlayer.train.precision.ShardedGradScaler` all ranks agree on), accumulation
    skips the reduce-scatter, checkpoints are DCP shards and ``export`` gathers them.

    Args:
        **options: :func:`~devlayer.train.fsdp.shard_model`'s options (``modules``,
            ``min_params``, ``precision``, ``cpu_offload``, ``reshard_after_forward``).
    """

    name = "fsdp"
    collective_export = True

    def __init__(self, **options: Any) -> None:
        self.options = options
        self._stager: Any = None  # background saves: this rank's shards' CPU copy, reused

    def precision(self, precision: str, device: Any) -> Precision:
        """FSDP casts the gathered parameters itself: no autocast; a sharded fp16 scaler."""
        return Precision(precision, device, autocast=False, scaler=ShardedGradScaler)

    def wrap(self, model: Any, optimizer: Any = None, precision: Precision | None = None) -> Any:
        """Shard ``model`` in place; ``optimizer`` is pointed at the shards, by name.

        The Trainer's ``precision`` sets the mixed-precision policy (over an own
        ``precision`` option, which ``prepare_model`` uses).
        """
        names = parameter_names(model)
        options = dict(self.options)
        if precision is not None:
            options["precision"] = precision.name
        sharded = shard_model(model, **options)  # checks first, then moves the model
        if optimizer is not None:
            rebind_optimizer(optimizer, names, sharded)
        return sharded

    def validation_fillers(self, batches: int) -> int:
        """Each forward gathers parameters, a collective: match the rank with most batches."""
        most = int(devlayer.all_reduce(batches, op="max"))
        if batches == 0 and most > 0:
            raise InvalidArgumentError(
                f"val_data gives rank {devlayer.rank()} no batch while another rank has "
                f"{most}; with strategy='fsdp' every rank must validate (each forward is a "
                f"collective): pass at least {devlayer.world_size()} validation samples"
            )
        return most - batches

    def save_state(
        self, model: Any, optimizer: Any, new_folder: Callable[[], Path]
    ) -> tuple[dict[str, Any], Path | None]:
        """Every rank writes its shards into rank 0's new temporary checkpoint folder."""
        folder = _agreed_folder(new_folder)
        try:
            write_shards(folder / SHARDS_DIR, model, optimizer, world_size=devlayer.world_size())
        except BaseException:
            if devlayer.is_main():
                shutil.rmtree(folder, ignore_errors=True)  # never a half-written checkpoint
            raise
        return {"model": None, "optimizer": None}, folder

    def background_state(
        self, model: Any, optimizer: Any, new_folder: Callable[[], Path]
    ) -> tuple[dict[str, Any], Path | None, Callable[[], None] | None]:
        """Every rank stages its shards now; DCP writes them in the background thread.

        DCP's own collectives (its plan and its finish, after which rank 0 has every rank's
        shards and ``.metadata``) run on a gloo group of their own, which nothing else uses:
        they cannot pair with the training's collectives. The staging copy is kept from one
        save to the next (:func:`~devlayer.train.sharded.shard_stager`): the training thread
        only copies into it, and it is freed by :meth:`release_staging`.
        """
        folder = _agreed_folder(new_folder)
        if self._stager is None:
            self._stager = shard_stager()
        try:
            written = write_shards_async(
                folder / SHARDS_DIR,
                model,
                optimizer,
                world_size=devlayer.world_size(),
                group=background_group(devlayer.world_size()),
                stager=self._stager,
            )
        except BaseException:
            if devlayer.is_main():
                shutil.rmtree(folder, ignore_errors=True)  # never a half-written checkpoint
            raise
        return {"model": None, "optimizer": None}, folder, written

    def release_staging(self) -> None:
        """Free the staging copy (call it once no background save is in flight)."""
        stager, self._stager = self._stager, None
        if stager is not None:
            stager.close()

    def load_state(
        self, model: Any, optimizer: Any, payload: Mapping[str, Any], path: Path, shards: Any
    ) -> None:
        """Sharded checkpoints only (a full model would need every rank to hold it)."""
        if shards is None:
            raise CheckpointError(
                f"{path} holds a full model (saved with strategy='ddp'), but this Trainer "
                "shards the model (strategy='fsdp') and resumes from sharded checkpoints "
                "only; resume it with strategy='ddp', or start a fresh run in a new "
                "checkpoint_dir"
            )
        super().load_state(model, optimizer, payload, path, shards)


def _agreed_folder(new_folder: Callable[[], Path]) -> Path:
    """Rank 0 creates the folder; every rank learns it, or rank 0's error."""
    folder, error = None, None
    if devlayer.is_main():
        try:
            folder = str(new_folder())
        except CheckpointError as exc:
            error = str(exc)
    folder, error = devlayer.broadcast_object((folder, error), src=0)
    if error is not None:
        raise CheckpointError(f"rank 0 could not save the checkpoint: {error}")
    return Path(folder)


def _shown(value: Any) -> str:
    try:
        return short_repr(value, 80)
    except ValueError:  # an int over 4300 digits has no repr
        return f"an int of {value.bit_length()} bits"


#: The strategies chosen by name.
STRATEGIES: dict[str, type[Strategy]] = {"ddp": DDPStrategy, "fsdp": FSDPStrategy}


def from_name(
    strategy: str | Strategy,
    *,
    fsdp: Mapping[str, Any] | None = None,
    ddp: Mapping[str, Any] | None = None,
    trainer: bool = False,
) -> Strategy:
    """The strategy object for a ``strategy=`` argument, its options checked.

    Args:
        strategy: ``"ddp"``, ``"fsdp"`` or a :class:`Strategy` instance (returned as is).
        fsdp: :func:`~devlayer.train.fsdp.shard_model` options (``"fsdp"`` only).
        ddp: ``DistributedDataParallel`` options (``"ddp"`` only).
        trainer: For the Trainer, whose ``precision=`` sets FSDP's policy (then ``fsdp``
            may not name one).

    Raises:
        InvalidArgumentError: An unknown name, or options the strategy does not take.

    Example:
        >>> from_name("fsdp", fsdp={"min_params": 10}).options
        {'min_params': 10}
    """
    if isinstance(strategy, Strategy):
        if fsdp is not None or ddp:
            raise InvalidArgumentError(
                f"strategy={short_repr(strategy)} is a Strategy object, which takes its "
                "options itself; pass them to its constructor instead of fsdp=/DDP options"
            )
        return strategy
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise InvalidArgumentError(
            f"strategy={_shown(strategy)}: use 'ddp' or 'fsdp', or pass a "
            "devlayer.train.strategy.Strategy object"
        )
    if strategy == "ddp":
        if fsdp is not None:
            raise InvalidArgumentError("fsdp= options need strategy='fsdp'")
        return DDPStrategy(**dict(ddp or {}))
    if ddp:
        raise InvalidArgumentError(
            f"DistributedDataParallel options {sorted(ddp)} with strategy='fsdp'; "
            f"pass FSDP options as fsdp={{...}}"
        )
    if trainer and fsdp is not None and "precision" in fsdp:
        raise InvalidArgumentError(
            "fsdp={'precision': ...}: the Trainer maps its own precision= to FSDP's "
            "mixed-precision policy; pass precision='bf16-mixed' to the Trainer instead"
        )
    return FSDPStrategy(**dict(fsdp or {}))
