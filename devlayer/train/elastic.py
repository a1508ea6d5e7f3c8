"""Resume at a changed world size, exactly: the global data position and the global batch.

A Trainer checkpoint records where the epoch stands as one number, the samples all ranks
consumed in the epoch's global order (:class:`~devlayer.train.data.GlobalOrder`), with the
batch plan that consumed them (per-rank micro-batch, gradient accumulation, world size).
A run at another world size (``allow_world_size_change=True``) keeps the global batch:
:func:`keep_global_batch` re-derives the per-rank micro-batch (never larger than the saved
one, so a rank needs no more memory) and the accumulation; the epoch continues at the exact
sample; the per-rank random generators are re-seeded from ``(seed, step, rank)``. What
cannot be kept is refused with :class:`~devlayer.train.errors.WorldSizeChangeError`. The
rules: docs/checkpoints.md, "Resume at another world size".

Example:
    >>> keep_global_batch(BatchPlan(32, 1, 2), 1)
    BatchPlan(per_rank_batch=32, grad_accum=2, world_size=1)
    >>> keep_global_batch(BatchPlan(32, 1, 2), 4)
    BatchPlan(per_rank_batch=16, grad_accum=1, world_size=4)
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from devlayer.train.data import ShardedLoader
from devlayer.train.errors import WorldSizeChangeError, WorldSizeChangeWarning

if TYPE_CHECKING:
    from devlayer.launchers import ProcessInfo

__all__ = [
    "RESCALE_LR",
    "BatchPlan",
    "WorldChange",
    "announce",
    "apply_world_change",
    "check_resumable_data",
    "data_position",
    "grow_back_warning",
    "is_data_position",
    "keep_global_batch",
    "plan_world_change",
    "rescaled_plan",
    "same_plan",
    "requested_plan",
    "reseed_value",
    "warn_if_cannot_grow_back",
]

log = logging.getLogger("devlayer.train")

#: ``allow_world_size_change=RESCALE_LR``: keep the per-rank batch and accumulation, let
#: the global batch follow the world size and scale the learning rate with it (linearly).
RESCALE_LR = "rescale_lr"

_POSITION_KEYS = ("seed", "epoch", "consumed", "per_rank_batch", "grad_accum", "world_size")


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's global batch is split.

    Attributes:
        per_rank_batch: Samples per micro-batch on one rank.
        grad_accum: Micro-batches per optimizer step.
        world_size: Ranks.
    """

    per_rank_batch: int
    grad_accum: int
    world_size: int

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over all ranks (per-rank batch x world x accumulation)."""
        return self.per_rank_batch * self.world_size * self.grad_accum

    def text(self) -> str:
        """``"per-rank batch 32 x world 2 x grad_accum 1 = 64"``."""
        return (
            f"per-rank batch {self.per_rank_batch} x world {self.world_size} x grad_accum "
            f"{self.grad_accum} = {self.global_batch}"
        )


def data_position(seed: int, epoch: int, batches_done: int, plan: BatchPlan) -> dict[str, int]:
    """The payload's ``"data"`` entry: the epoch's global position and the plan behind it.

    Example:
        >>> data_position(7, 2, 3, BatchPlan(8, 1, 2))["consumed"]
        48
    """
    return {
        "seed": int(seed),
        "epoch": int(epoch),
        "consumed": batches_done * plan.per_rank_batch * plan.world_size,
        "per_rank_batch": plan.per_rank_batch,
        "grad_accum": plan.grad_accum,
        "world_size": plan.world_size,
    }


def is_data_position(value: object) -> bool:
    """Whether ``value`` has the shape :func:`data_position` gives (for the payload check).

    Example:
        >>> is_data_position(data_position(0, 0, 0, BatchPlan(1, 1, 1))), is_data_position({})
        (True, False)
    """
    if not isinstance(value, Mapping) or set(value) != set(_POSITION_KEYS):
        return False
    ints = all(isinstance(value[k], int) and not isinstance(value[k], bool) for k in value)
    return (
        ints
        and value["seed"] >= 0
        and value["epoch"] >= 0
        and value["consumed"] >= 0
        and (min(value["per_rank_batch"], value["grad_accum"], value["world_size"]) >= 1)
    )


def requested_plan(data: Any, batch_size: int | None, grad_accum: int) -> BatchPlan | None:
    """The plan this run asks for (``None``: the global batch does not split; the
    loader then says why, unless a resume re-derives it).

    Example:
        >>> import devlayer
        >>> with devlayer.init(backend="cpu"):
        ...     requested_plan(None, 64, 2)
        BatchPlan(per_rank_batch=32, grad_accum=2, world_size=1)
    """
    import devlayer

    if isinstance(data, ShardedLoader):
        return BatchPlan(data.batch_size, grad_accum, data.world_size)
    world = devlayer.world_size()
    total = batch_size if batch_size is not None else getattr(data, "batch_size", None)
    if not isinstance(total, int) or total < 1 or total % (world * grad_accum):
        return None
    return BatchPlan(total // (world * grad_accum), grad_accum, world)


def same_plan(payload: Mapping[str, Any], plan: BatchPlan | None) -> bool:
    """Whether the payload's data position was counted with ``plan`` (or has none: a
    checkpoint of an older devlayer, resumed as it always was at the same world size)."""
    data = payload.get("data")
    return data is None or (plan is not None and _saved_plan(data) == plan)


def _divisors_up_to(n: int, cap: int) -> int:
    """The largest divisor of ``n`` that is at most ``cap`` (1 at least)."""
    best = 1
    i = 1
    while i * i <= n:
        if n % i == 0:
            for d in (i, n // i):
                if best < d <= cap:
                    best = d
        i += 1
    return best


def keep_global_batch(saved: BatchPlan, world: int) -> BatchPlan:
    """The plan at ``world`` ranks with the same global batch as ``saved``.

    The per-rank micro-batch is the largest that divides the new per-rank share and is at
    most the saved one (a rank never needs more memory than before); the accumulation
    makes up the rest.

    Raises:
        WorldSizeChangeError: The global batch does not split over ``world`` ranks; the
            message names the numbers, the world sizes that work and the opt-in.

    Example:
        >>> keep_global_batch(BatchPlan(4, 3, 2), 3).text()
        'per-rank batch 4 x world 3 x grad_accum 2 = 24'
    """
    total = saved.global_batch
    if total % world:
        fits = [w for w in range(1, min(total, 64) + 1) if total % w == 0]
        raise WorldSizeChangeError(
            f"the checkpoint's global batch ({saved.text()}) does not split over "
            f"world_size={world} ranks, so it cannot be kept; run at a world size that "
            f"divides {total} ({', '.join(map(str, fits))}), or pass "
            f"allow_world_size_change={RESCALE_LR!r} to keep per-rank batch "
            f"{saved.per_rank_batch} x grad_accum {saved.grad_accum} (global batch "
            f"{saved.per_rank_batch * saved.grad_accum * world}) and scale the learning rate "
            "by the same factor"
        )
    share = total // world
    per_rank = _divisors_up_to(share, saved.per_rank_batch)
    return BatchPlan(per_rank, share // per_rank, world)


def rescaled_plan(saved: BatchPlan, world: int) -> tuple[BatchPlan, float]:
    """The opt-in: same per-rank batch and accumulation at ``world``; the LR factor.

    Example:
        >>> rescaled_plan(BatchPlan(32, 1, 2), 3)
        (BatchPlan(per_rank_batch=32, grad_accum=1, world_size=3), 1.5)
    """
    plan = BatchPlan(saved.per_rank_batch, saved.grad_accum, world)
    return plan, plan.global_batch / saved.global_batch


def reseed_value(seed: int, step: int, rank: int) -> int:
    """The seed of rank ``rank`` after a world-size change at ``step`` (within 32 bits).

    Example:
        >>> reseed_value(7, 24, 0) != reseed_value(7, 24, 1)
        True
    """
    return (int(seed) * 1_000_003 + int(step) * 10_007 + int(rank)) % (2**32)


@dataclass(frozen=True)
class WorldChange:
    """What a resume at a changed world size re-derived (applied by the Trainer).

    Attributes:
        old: The saved plan (``None``: an old checkpoint without a data position).
        new: The plan of this run (``None`` with ``old``).
        epoch: The epoch to continue.
        batches_done: This rank's micro-batches of that epoch already consumed.
        step: The optimizer step to continue from.
        sums: This rank's running (loss sum, samples) of the epoch.
        lr_factor: Learning-rate factor (1.0 unless the opt-in rescales it).
        old_world: The saved world size.
        new_world: This run's world size.
    """

    old: BatchPlan | None
    new: BatchPlan | None
    epoch: int
    batches_done: int
    step: int
    sums: tuple[float, int]
    lr_factor: float
    old_world: int
    new_world: int

    def record(self) -> dict[str, Any]:
        """The metrics-file line of this change: ``"event": "world_size_change"``, its
        ``global_step``, then :meth:`data`."""
        return {"event": "world_size_change", "global_step": self.step, **self.data()}

    def data(self) -> dict[str, Any]:
        """What the loggers get with the ``"world_size_change"`` event: the epoch, both
        world sizes and what was re-derived."""
        rederived: dict[str, Any] = {}
        if self.old is not None and self.new is not None:
            for name in ("per_rank_batch", "grad_accum", "global_batch"):
                before, after = getattr(self.old, name), getattr(self.new, name)
                if before != after:
                    rederived[name] = [before, after]
            if self.lr_factor != 1.0:
                rederived["lr_factor"] = self.lr_factor
            rederived["rng"] = "re-seeded from (seed, step, rank)"
        else:
            rederived["data"] = "the interrupted epoch restarts (checkpoint without position)"
        return {
            "epoch": self.epoch,
            "old_world_size": self.old_world,
            "new_world_size": self.new_world,
            "rederived": rederived,
        }


def _saved_plan(data: Mapping[str, Any]) -> BatchPlan:
    return BatchPlan(int(data["per_rank_batch"]), int(data["grad_accum"]), int(data["world_size"]))


def _merged_sums(ranks: Sequence[Mapping[str, Any]], rank: int) -> tuple[float, int]:
    """The saved ranks' running sums, all on rank 0 (the epoch's totals stay exact)."""
    if rank != 0:
        return 0.0, 0
    return sum(float(r["loss_sum"]) for r in ranks), sum(int(r["samples"]) for r in ranks)


def plan_world_change(
    payload: Mapping[str, Any], *, world: int, rank: int, mode: bool | str, seed: int
) -> WorldChange:
    """Re-derive the batch plan and the data position for this world size (pure).

    Args:
        payload: The Trainer payload of the checkpoint (its ``"data"`` entry decides).
        world: This run's world size.
        rank: This rank.
        mode: ``allow_world_size_change``: ``True`` keeps the global batch,
            :data:`RESCALE_LR` keeps the per-rank batch and rescales the learning rate.
        seed: This run's seed (the data order is drawn from it).

    Raises:
        WorldSizeChangeError: The global batch cannot be kept at ``world`` ranks, or the
            checkpoint's data order was drawn with another seed.
    """
    data = payload.get("data")
    epoch, step = int(payload["epoch"]), int(payload["global_step"])
    old_world = len(payload["ranks"])
    if data is None:  # written before the position was global: the documented reset
        return WorldChange(None, None, epoch, 0, step, (0.0, 0), 1.0, old_world, world)
    if int(data["seed"]) != seed:
        raise WorldSizeChangeError(
            f"the checkpoint's data order was drawn with seed={data['seed']}, this run has "
            f"seed={seed}: the epoch could not continue at its exact sample; pass "
            f"seed={data['seed']} as the run that saved it did"
        )
    old = _saved_plan(data)
    if mode == RESCALE_LR:
        new, factor = rescaled_plan(old, world)
    else:
        new, factor = keep_global_batch(old, world), 1.0
    consumed = int(data["consumed"])
    if consumed % new.global_batch:  # only with the opt-in: the global batch changed
        raise WorldSizeChangeError(
            f"the checkpoint stands at sample {consumed} of epoch {epoch}, not a whole number "
            f"of the new global batches ({new.text()}), so the epoch cannot continue at "
            f"its exact sample; resume from a checkpoint saved at an epoch's end, or at a "
            f"world size that keeps the global batch {old.global_batch} "
            "(allow_world_size_change=True)"
        )
    micro = new.per_rank_batch * world
    sums = _merged_sums(payload["ranks"], rank)
    return WorldChange(old, new, epoch, consumed // micro, step, sums, factor, old_world, world)


def check_resumable_data(data: Any) -> None:
    """Refuse training data whose position a world-size change cannot carry.

    A :class:`~devlayer.train.data.ShardedLoader` was split for the world it was built at,
    and a DataLoader's own sampler (other than torch's random or sequential one) or batch
    sampler decides an order the Trainer cannot continue at another world size.

    Raises:
        WorldSizeChangeError: Naming what was passed and what to pass instead.
    """
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

    fix = (
        "pass the Dataset itself (or a DataLoader with shuffle=True/False and no sampler): "
        "the Trainer then splits its global order at the new world size"
    )
    if isinstance(data, ShardedLoader):
        raise WorldSizeChangeError(
            "train_data is a ShardedLoader, split for the world size it was built at; its "
            f"position cannot be carried to another world size; {fix}"
        )
    if isinstance(data, DataLoader):
        sampler, batches = data.sampler, data.batch_sampler
        own = not isinstance(sampler, (RandomSampler, SequentialSampler))
        if own or (batches is not None and type(batches) is not BatchSampler):
            seen = type(sampler if own else batches).__name__
            raise WorldSizeChangeError(
                f"train_data is a DataLoader with its own sampler ({seen}), whose position "
                f"cannot be carried to another world size; {fix}"
            )


def announce(change: WorldChange, *, seed: int, rank: int, is_main: bool) -> int:
    """Re-seed this rank's generators from ``(seed, step, rank)`` and log the change.

    Returns:
        The seed this rank now uses.
    """
    from devlayer.train.seed import seed_everything

    value = reseed_value(seed, change.step, rank)
    seed_everything(value, per_rank=False)
    if is_main:
        old, new = change.old, change.new
        kept = (
            f"{old.text()} -> {new.text()}"
            if old is not None and new is not None
            else "the checkpoint has no data position: the interrupted epoch restarts"
        )
        what = (
            f"world size changed {change.old_world} -> {change.new_world}"
            if change.old_world != change.new_world
            else "the checkpoint's batch plan differs from this run's (its global batch is kept)"
        )
        log.warning(
            "%s at step %d: %s; per-rank random generators re-seeded from (seed=%d, step=%d, rank)",
            what,
            change.step,
            kept,
            seed,
            change.step,
        )
    return value


def apply_world_change(trainer: Any, payload: Mapping[str, Any]) -> WorldChange:
    """Resume ``trainer`` from ``payload`` saved at another world size (or batch plan).

    Keeps the global batch (the Trainer's ``batch_size`` and ``grad_accum``, and its
    optimizer steps' accumulation, re-derived) or, with ``"rescale_lr"``, scales the
    learning rate; continues the epoch at its global position; re-seeds per rank and logs
    it. The Trainer then sends it to its loggers as the ``"world_size_change"`` event
    (docs/checkpoints.md).

    Args:
        trainer: The :class:`~devlayer.train.trainer.Trainer` being resumed (after its
            ``fit()`` set up its loop parts).
        payload: The checkpoint's payload (with its ``data`` position).

    Returns:
        The :class:`WorldChange` (also kept as ``trainer.world_change``).

    Raises:
        WorldSizeChangeError: The global batch cannot be kept (naming the numbers).
    """
    import devlayer
    from devlayer.train.lr_scaling import scale_lr

    st = devlayer.state()
    change = plan_world_change(
        payload,
        world=st.world_size,
        rank=st.rank,
        mode=trainer.allow_world_size_change,
        seed=trainer.seed,
    )
    if change.new is not None:
        trainer.grad_accum, trainer.batch_size = change.new.grad_accum, change.new.global_batch
        if trainer.steps is not None:
            trainer.steps.grad_accum = change.new.grad_accum
    if change.lr_factor != 1.0:
        scale_lr(trainer.optimizer, trainer.scheduler, change.lr_factor)
    state = trainer.state
    state.epoch, state.global_step = change.epoch, change.step
    state.batches_done = change.batches_done
    trainer.epoch_sums.resumed = change.sums
    announce(change, seed=trainer.seed, rank=st.rank, is_main=st.is_main)
    trainer.world_change = change
    return change


def grow_back_warning(info: ProcessInfo, allow_world_size_change: bool | str) -> str | None:
    """Why a job that asks to change its world size cannot grow back, else ``None``.

    Under torchrun with a shared agent store (``ProcessInfo.agent_store``, which only the
    torchrun detector sets: ``accelerate launch`` runs torchrun) and restarts allowed
    (``max_restarts > 0``), torch 2.13's surviving rank-0 agent keeps the store
    address of its first rendezvous round and never publishes one for the round in which
    an agent rejoins, so growing back times out inside torch (shrinking works).

    Args:
        info (ProcessInfo): This process, as its launcher described it.
        allow_world_size_change (bool | str): The Trainer's option.

    Returns:
        str | None: The warning's text (the variables that say so, why, the fix).

    Example:
        >>> from devlayer.launchers import ProcessInfo
        >>> grow_back_warning(ProcessInfo(launcher="torchrun", max_restarts=3), True) is None
        True
        >>> info = ProcessInfo(launcher="torchrun", max_restarts=3, agent_store=True)
        >>> "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun" in grow_back_warning(info, True)
        True
    """
    if not allow_world_size_change or not info.agent_store or info.max_restarts <= 0:
        return None
    store = info.sources.get("agent_store", "agent_store")
    restarts = info.sources.get("max_restarts", "max_restarts")
    return (
        f"allow_world_size_change={allow_world_size_change!r} under {info.launcher} with "
        f"its agent's shared rendezvous store ({store}=True) and restarts allowed "
        f"({restarts}={info.max_restarts}): the job can shrink, but it cannot grow back, "
        "since (torch 2.13) the surviving rank-0 agent keeps its first round's store address "
        "and never publishes one for the round in which an agent rejoins (torch's "
        "rendezvous times out). Set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on every agent "
        "(TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun ...), or start the job with "
        "`devlayer launch`, which sets it; see docs/checkpoints.md, \"With torchrun's "
        'elastic mode"'
    )


def warn_if_cannot_grow_back(trainer: Any) -> None:
    """Warn (:class:`~devlayer.train.errors.WorldSizeChangeWarning`, rank 0, once per
    Trainer) when :func:`grow_back_warning` has a text for ``trainer``'s process."""
    import devlayer

    if trainer.grow_back_checked:
        return
    trainer.grow_back_checked = True
    st = devlayer.state()
    text = grow_back_warning(st.process, trainer.allow_world_size_change)
    if text is not None and st.is_main:
        warnings.warn(text, WorldSizeChangeWarning, stacklevel=2)
