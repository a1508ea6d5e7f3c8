"""``prepare_loader``: a DataLoader that shards, splits the global batch and sets the epoch.

What users of raw torchrun scripts do by hand (and forget): ``DistributedSampler``,
``batch_size // world_size``, ``sampler.set_epoch(epoch)`` every epoch, a sensible
``num_workers`` per rank, ``pin_memory`` on accelerators. :func:`prepare_loader` does all of
it and returns a :class:`ShardedLoader`, which iterates like a DataLoader.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sized
from typing import Any

from devlayer.devices import usable_cpus
from devlayer.errors import InvalidArgumentError

__all__ = [
    "MAX_BATCH_SIZE",
    "GlobalOrder",
    "MIN_WORKERS_LIMIT",
    "ShardedLoader",
    "WORKERS_PER_CPU",
    "auto_num_workers",
    "check_num_workers",
    "max_num_workers",
    "prepare_loader",
]


#: The largest batch a DataLoader can slice (``itertools.islice`` takes a C ``ssize_t``).
MAX_BATCH_SIZE = 2**63 - 1
#: An explicit ``num_workers`` above the rank's CPUs is allowed with a warning (workers that
#: wait on I/O can use more than one each), up to this many per CPU of the rank, and never
#: refused below :data:`MIN_WORKERS_LIMIT`; beyond that it is an error (``num_workers=10**6``
#: would fork until the system refuses).
WORKERS_PER_CPU = 4
MIN_WORKERS_LIMIT = 8


def max_num_workers(
    local_world_size: int = 1,
    *,
    cpus_per_rank: int | None = None,
    cpus: int | None = None,
) -> int:
    """The most DataLoader workers one rank may start: the CPUs it may use, at least 1.

    When the launcher gives each rank CPUs of its own (``cpus_per_rank``: what
    :attr:`ProcessInfo.cpus_per_rank <devlayer.launchers.ProcessInfo.cpus_per_rank>` parsed,
    ``--cpus-per-task`` under srun) those are the rank's. Otherwise the CPUs this process
    may run on (``cpus``, default ``os.sched_getaffinity``) are shared by the
    ``local_world_size`` ranks of the node (torchrun inside one srun task, or no scheduler).
    More workers than that only compete for the same CPUs (and a huge number forks until the
    system refuses). Reads no environment variable.

    Args:
        local_world_size: Ranks on this node sharing its CPUs.
        cpus_per_rank: The CPUs the rank has for itself, or ``None``.
        cpus: The CPUs this process may run on (default: its affinity).

    Example:
        >>> max_num_workers(2, cpus=16)
        8
        >>> max_num_workers(4, cpus_per_rank=8)
        8
        >>> max_num_workers(4, cpus=2)
        1
    """
    if cpus_per_rank is not None:
        return max(cpus_per_rank, 1)
    if cpus is None:
        cpus = usable_cpus()
    return max((cpus or 1) // max(local_world_size, 1), 1)


def auto_num_workers(
    local_world_size: int = 1,
    *,
    cpus_per_rank: int | None = None,
    cpus: int | None = None,
) -> int:
    """DataLoader workers per rank: usable CPUs per rank minus one for the main process.

    The CPUs per rank are counted as in :func:`max_num_workers`.

    Example:
        >>> auto_num_workers(2, cpus=16)
        7
        >>> auto_num_workers(4, cpus_per_rank=8)  # srun: each rank its own task
        7
        >>> auto_num_workers(4, cpus=32)  # torchrun in one task: shared
        7
    """
    per_rank = max_num_workers(local_world_size, cpus_per_rank=cpus_per_rank, cpus=cpus)
    return max(per_rank - 1, 0)


def check_num_workers(
    num_workers: Any, local_world_size: int = 1, *, cpus_per_rank: int | None = None
) -> int:
    """``num_workers`` as workers per rank: ``"auto"``, or an int from 0 to the limit.

    Above the CPUs this rank may use (:func:`max_num_workers`) is allowed with a warning, as
    torch's DataLoader does; above :data:`WORKERS_PER_CPU` times those CPUs (and at least
    :data:`MIN_WORKERS_LIMIT`) is an error, raised before any worker is forked.

    Args:
        num_workers: ``"auto"`` or an int >= 0.
        local_world_size: Ranks on this node sharing its CPUs.
        cpus_per_rank: The CPUs the rank has for itself (``ProcessInfo.cpus_per_rank``),
            or ``None``: the process's CPUs are shared by the local ranks.

    Returns:
        The number of workers to start.

    Raises:
        InvalidArgumentError: Not ``"auto"`` nor an int >= 0, or over the limit; the message
            names the value, the limit and the CPUs of the rank.

    Example:
        >>> check_num_workers(0, 1), check_num_workers("auto", 1) >= 0
        (0, True)
    """
    kw: dict[str, Any] = {"cpus_per_rank": cpus_per_rank}
    if isinstance(num_workers, str) and num_workers == "auto":
        return auto_num_workers(local_world_size, **kw)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise InvalidArgumentError(f"num_workers={num_workers!r}: use 'auto' or an int >= 0")
    cpus = max_num_workers(local_world_size, **kw)
    if num_workers <= cpus:
        return num_workers
    sharing = cpus_per_rank is None and local_world_size > 1
    shared = f", shared by {local_world_size} local ranks" if sharing else ""
    # Python refuses to print an int of over 4300 digits: name such a one by its size.
    seen = num_workers if num_workers < 2**64 else f"an int of {num_workers.bit_length()} bits"
    where = f"the {cpus} CPU(s) this rank may use{shared}"
    limit = max(MIN_WORKERS_LIMIT, WORKERS_PER_CPU * cpus)
    if num_workers > limit:
        raise InvalidArgumentError(
            f"num_workers={seen} is more than {WORKERS_PER_CPU} DataLoader workers per CPU of "
            f"{where}: at most {limit} worker(s) per rank; pass num_workers <= {cpus} "
            f"(one per CPU), or 'auto' ({auto_num_workers(local_world_size, **kw)} here)"
        )
    warnings.warn(
        f"num_workers={seen} is more than {where}: the workers compete for them "
        f"(fine for loaders that wait on I/O); 'auto' gives "
        f"{auto_num_workers(local_world_size, **kw)} here",
        UserWarning,
        stacklevel=3,
    )
    return num_workers


class _ResumableSampler:
    """Wraps a sampler: ``set_epoch`` plus skipping the first N indices once."""

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def skip_next(self, n: int) -> None:
        self._skip = n

    def __iter__(self) -> Iterator[int]:
        # Iterated by ShardedLoader, on the CPU as default device (see ShardedLoader._on_cpu).
        skip, self._skip = self._skip, 0
        return iter(list(self.sampler)[skip:])

    def __len__(self) -> int:
        return len(self.sampler)


class GlobalOrder:
    """One epoch's order over all ranks; rank ``r`` takes global positions r, r+world, ...

    The order is a permutation drawn from ``seed + epoch`` (or ``range(n)`` without
    shuffling), repeated from its start up to a multiple of ``multiple`` samples, or cut
    down to one with ``drop_last``. With ``multiple=world`` it is exactly torch's
    ``DistributedSampler``. The global micro-batch ``k`` (rank batches ``k`` of every rank)
    is the block of positions ``[k*M, (k+1)*M)`` with ``M`` the global micro-batch, at any
    world size: a position in the epoch is one number, the samples consumed (what a
    resume at another world size continues from). With ``multiple`` the global batch of
    an optimizer step, the padded epoch is the same at every world size dividing it.

    Example:
        >>> order = GlobalOrder(5, world=2, rank=1, shuffle=False, seed=0, multiple=4)
        >>> list(order), len(order)
        ([1, 3, 0, 2], 4)
    """

    def __init__(
        self,
        n: int,
        world: int,
        rank: int,
        shuffle: bool,
        seed: int,
        multiple: int,
        drop_last: bool = False,
    ) -> None:
        self.n, self.world, self.rank, self.shuffle, self.seed = n, world, rank, shuffle, seed
        self.multiple = multiple
        self.epoch = 0
        whole = (n // multiple) * multiple if drop_last else -(-n // multiple) * multiple
        self.total = whole if n else 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def positions(self) -> list[int]:
        """The epoch's global order (before the split over ranks)."""
        import torch

        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        return [order[i % self.n] for i in range(self.total)]

    def __iter__(self) -> Iterator[int]:
        return iter(self.positions()[self.rank :: self.world])

    def __len__(self) -> int:
        return self.total // self.world


class _ExactShard:
    """Every ``world``-th index from ``rank``, no repeats (for evaluation)."""

    def __init__(self, n: int, world: int, rank: int, shuffle: bool, seed: int) -> None:
        self.n, self.world, self.rank, self.shuffle, self.seed = n, world, rank, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        import torch

        order = list(range(self.n))
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        return iter(order[self.rank :: self.world])

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


class ShardedLoader:
    """A DataLoader over this rank's shard that moves to the next epoch on each iteration.

    Iterating calls ``set_epoch`` on the sampler with the current epoch (so every epoch is
    shuffled differently, identically on all ranks) and then advances the epoch. Use
    :meth:`set_epoch` to jump (e.g. when resuming) and :meth:`skip_batches` (this rank's
    batches) or :meth:`skip_samples` (the global position, at any world size) to resume in
    the middle of an epoch. Other attributes are the underlying DataLoader's.

    Attributes:
        loader: The torch DataLoader.
        epoch: The epoch the next iteration runs.
        global_batch_size: Samples per step summed over ranks.
        batch_size: Samples per step on this rank.
        world_size: Ranks the data is split over.
        step_samples: The epoch is padded (or cut) to a multiple of this many samples;
            ``None`` when the sampler has no global order (``pad=False``).
    """

    def __init__(
        self,
        loader: Any,
        sampler: _ResumableSampler | None,
        seed: int,
        rank: int,
        global_batch_size: int,
        *,
        world_size: int = 1,
        step_samples: int | None = None,
    ) -> None:
        self.loader = loader
        self.resumable = sampler
        self.seed = seed
        self.rank = rank
        self.epoch = 0
        self.global_batch_size = global_batch_size
        self.batch_size = loader.batch_size
        self.world_size = world_size
        self.step_samples = step_samples

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration run ``epoch``."""
        self.epoch = int(epoch)

    def skip_batches(self, n: int) -> None:
        """Skip the first ``n`` batches of the next iteration (mid-epoch resume)."""
        if n < 0:
            raise InvalidArgumentError(f"skip_batches({n}): n must be >= 0")
        if self.resumable is None:
            raise InvalidArgumentError("this loader has no sampler to skip batches with")
        self.resumable.skip_next(n * self.loader.batch_size)

    def skip_samples(self, n: int) -> None:
        """Start the next iteration at global position ``n`` of the epoch's order.

        The position is the count of samples all ranks consumed, so a run at another world
        size continues at the exact sample (see :class:`GlobalOrder`).

        Raises:
            InvalidArgumentError: No global order (``pad=False``), or ``n`` is negative or
                does not split evenly over the ranks.
        """
        if self.step_samples is None or self.resumable is None:
            raise InvalidArgumentError(
                "this loader has no global order to skip samples in (built with pad=False)"
            )
        if n < 0 or n % self.world_size:
            raise InvalidArgumentError(
                f"skip_samples({n}): the position must be >= 0 and a multiple of "
                f"world_size={self.world_size}"
            )
        self.resumable.skip_next(n // self.world_size)

    def __iter__(self) -> Iterator[Any]:
        epoch = self.epoch
        if self.resumable is not None:
            self.resumable.set_epoch(epoch)
        generator = getattr(self.loader, "generator", None)
        if generator is not None:
            # Worker seeds (augmentation) depend on (seed, rank, epoch), not on how much
            # randomness the training loop consumed: resuming reproduces them exactly.
            generator.manual_seed(_mix(self.seed, self.rank, epoch))
        self.epoch = epoch + 1
        import torch

        if torch.get_default_device().type == "cpu":
            return iter(self.loader)
        return self._on_cpu()

    def _on_cpu(self) -> Iterator[Any]:
        """Iterate with the CPU as torch's default device.

        ``devlayer.init`` makes the accelerator the default device. The DataLoader builds its
        base seed with ``torch.empty(...).random_(generator=<cpu generator>)``, which fails
        on an accelerator default device; default collate would also build batches there
        (and forked workers would touch the accelerator); the samplers draw with CPU
        generators too. Batches come out on the CPU, as from any DataLoader; the training
        loop moves them.
        """
        import torch

        with torch.device("cpu"):
            it = iter(self.loader)
        while True:
            with torch.device("cpu"):
                try:
                    batch = next(it)
                except StopIteration:
                    return
            yield batch

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


def _mix(seed: int, rank: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + rank * 10_007 + epoch) % (2**63)


def _reuse_loader(
    source: Any,
    batch_size: int | None,
    shuffle: bool | None,
    num_workers: int | str,
    loader_kwargs: dict[str, Any],
) -> tuple[Any, int | None, bool | None]:
    """``(dataset, batch_size, shuffle)`` of an existing DataLoader to re-shard.

    Its collate_fn and worker settings go into ``loader_kwargs`` unless given there; a
    RandomSampler means ``shuffle=True``.
    """
    from torch.utils.data import RandomSampler

    if batch_size is None:
        batch_size = source.batch_size
    if shuffle is None:
        shuffle = isinstance(source.sampler, RandomSampler)
    for key in (
        "collate_fn",
        "timeout",
        "worker_init_fn",
        "multiprocessing_context",
        "prefetch_factor",
    ):
        if key not in loader_kwargs and getattr(source, key, None) is not None:
            loader_kwargs[key] = getattr(source, key)
    if loader_kwargs.get("prefetch_factor") is not None and num_workers in (0, "auto"):
        loader_kwargs.pop("prefetch_factor", None)
    return source.dataset, batch_size, shuffle


def _per_rank_batch(batch_size: int | None, world: int, per_rank: bool) -> int:
    """This rank's batch: the global ``batch_size`` split evenly, or itself with ``per_rank``."""
    if batch_size is None:
        raise InvalidArgumentError(
            "prepare_loader() needs batch_size (the global batch over all ranks) for a Dataset"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgumentError(f"batch_size={batch_size!r} must be an int >= 1")
    if batch_size > MAX_BATCH_SIZE:
        raise InvalidArgumentError(
            f"batch_size={batch_size!r} is larger than any DataLoader can slice (at most "
            "2**63-1); pass the number of samples per step"
        )
    if per_rank:
        return batch_size
    if batch_size % world:
        raise InvalidArgumentError(
            f"global batch_size={batch_size} does not split evenly over world_size={world} "
            f"ranks; use a multiple of {world} (e.g. {math.ceil(batch_size / world) * world})"
            f", or pass per_rank=True to give the per-rank batch size"
        )
    return batch_size // world


def prepare_loader(
    dataset: Any,
    batch_size: int | None = None,
    *,
    shuffle: bool | None = None,
    drop_last: bool = False,
    num_workers: int | str = "auto",
    seed: int = 0,
    per_rank: bool = False,
    pad: bool = True,
    step_samples: int | None = None,
    **loader_kwargs: Any,
) -> ShardedLoader:
    """A loader over this rank's shard of ``dataset`` with the global batch split evenly.

    Args:
        dataset: A map-style Dataset, or an existing DataLoader to re-shard (its dataset,
            collate_fn and batch size are reused; a RandomSampler means ``shuffle=True``).
        batch_size: The GLOBAL batch size, split evenly over the ranks (default: the
            DataLoader's batch size). With ``per_rank=True`` it is the per-rank size.
        shuffle: Shuffle each epoch (default True, or what the DataLoader did).
        drop_last: Drop the last incomplete batch (and make shards equal by dropping
            instead of padding).
        num_workers: Workers per rank, or ``"auto"`` (usable CPUs per rank minus one,
            respecting CPU affinity and ``ProcessInfo.cpus_per_rank``). At most the CPUs this
            rank may use (:func:`max_num_workers`): more is refused.
        seed: Shuffling seed; shards are identical on all ranks for the same seed.
        per_rank: Treat ``batch_size`` as per rank instead of global.
        pad: Repeat samples so every rank gets the same number of batches (needed when each
            batch ends in a collective, as in training). ``False`` shards without repeats:
            exact evaluation metrics, but ranks may see one batch more or less.
        step_samples: Pad (or with ``drop_last`` cut) each epoch to a multiple of this many
            samples instead of a multiple of the world size: with the global batch of an
            optimizer step, every step is full and the epoch is the same at every world
            size that divides it (what an exact resume at another world size needs).
            A multiple of the world size; default: the world size.
        **loader_kwargs: Passed to ``torch.utils.data.DataLoader`` (``collate_fn``...).

    Returns:
        A :class:`ShardedLoader`. Every rank sees the same number of batches (the sampler
        pads a shard by repeating samples when the dataset does not divide evenly).

    Raises:
        InvalidArgumentError: A global batch that the world size does not divide, a
            non-positive batch size, a missing batch size, or ``num_workers`` above the
            CPUs of the rank.

    Example:
        >>> import torch, devlayer
        >>> from torch.utils.data import TensorDataset
        >>> _ = devlayer.init(backend="cpu")
        >>> loader = devlayer.prepare_loader(TensorDataset(torch.arange(10.)), 4, num_workers=0)
        >>> [len(b[0]) for b in loader]
        [4, 4, 2]
        >>> _ = devlayer.shutdown()
    """
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    import devlayer

    if not devlayer.is_initialized():
        devlayer.init()
    st = devlayer.state()
    world, rank = st.world_size, st.rank

    if isinstance(dataset, DataLoader):
        dataset, batch_size, shuffle = _reuse_loader(
            dataset, batch_size, shuffle, num_workers, loader_kwargs
        )
    if shuffle is None:
        shuffle = True
    per_rank_batch = _per_rank_batch(batch_size, world, per_rank)
    if not isinstance(dataset, Sized) or isinstance(dataset, IterableDataset):
        # An IterableDataset (even one with __len__) decides its own order: it can be
        # neither split by a sampler nor resumed at a position.
        raise InvalidArgumentError(
            f"prepare_loader() needs a map-style dataset with __len__; got "
            f"{type(dataset).__name__}, whose position in an epoch cannot be split by rank "
            "nor carried by a checkpoint; pass a map-style Dataset (__getitem__ and "
            "__len__), or shard an IterableDataset yourself by rank"
        )
    workers = check_num_workers(
        num_workers, st.local_world_size, cpus_per_rank=st.process.cpus_per_rank
    )

    data: Any = dataset
    multiple = _step_samples(step_samples, world)
    sampler: Any
    if pad or drop_last:
        sampler = GlobalOrder(len(data), world, rank, shuffle, seed, multiple, drop_last)
    else:
        sampler = _ExactShard(len(data), world, rank, shuffle, seed)
    resumable = _ResumableSampler(sampler)
    loader_kwargs.setdefault("pin_memory", st.device.type != "cpu")
    if workers > 0:
        loader_kwargs.setdefault("persistent_workers", True)
    loader: Any = DataLoader(
        data,
        batch_size=per_rank_batch,
        sampler=resumable,
        num_workers=workers,
        drop_last=drop_last,
        generator=torch.Generator(device="cpu"),
        **loader_kwargs,
    )
    return ShardedLoader(
        loader,
        resumable,
        seed,
        rank,
        per_rank_batch * world,
        world_size=world,
        step_samples=multiple if (pad or drop_last) else None,
    )


def _step_samples(step_samples: Any, world: int) -> int:
    """The multiple an epoch is padded to: ``step_samples`` (checked) or the world size."""
    if step_samples is None:
        return world
    if isinstance(step_samples, bool) or not isinstance(step_samples, int) or step_samples < 1:
        raise InvalidArgumentError(f"step_samples={step_samples!r} must be an int >= 1")
    if step_samples % world:
        raise InvalidArgumentError(
            f"step_samples={step_samples} does not split evenly over world_size={world} "
            f"ranks; use a multiple of {world}"
        )
    return step_samples
