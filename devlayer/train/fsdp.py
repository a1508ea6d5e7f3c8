"""Sharded data parallel (FSDP2): parameters, gradients and optimizer state split over ranks.

:func:`shard_model` applies torch's ``fully_shard`` over a one-dimensional ``DeviceMesh`` of
this rank's device type, so the same call shards on CUDA/ROCm (nccl), Intel XPU (xccl), and
CPU (gloo). Nothing here names a vendor: the device type comes from :func:`devlayer.state`.

What is sharded: every submodule whose own parameters (those not already in a sharded
child) reach ``min_params`` becomes its own FSDP unit, bottom-up, then the root takes the
rest; or, with ``modules=(Block,)``, every instance of those classes. A unit's parameters
are gathered just before its forward (and backward) and freed after, so peak memory holds
one unit's full parameters, not the model's.

Use it through ``devlayer.prepare_model(model, strategy="fsdp")``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from devlayer.errors import InvalidArgumentError

__all__ = [
    "FSDP_MIN_PARAMS",
    "full_state_dict",
    "is_sharded",
    "local_numel",
    "parameter_names",
    "rebind_optimizer",
    "shard_model",
    "skip_grad_sync",
]

#: Default size threshold: a submodule with at least this many parameters of its own
#: becomes an FSDP unit (FSDP1's size-based policy defaulted to 1e8, far too coarse for
#: the models people fine-tune on one node; 1e6 keeps each unit a few MB).
FSDP_MIN_PARAMS = 1_000_000

_PRECISIONS = {"bf16-mixed": "bfloat16", "16-mixed": "float16"}


def _mixed_precision(precision: Any) -> Any:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision is None or isinstance(precision, MixedPrecisionPolicy):
        return precision or MixedPrecisionPolicy()
    if precision in ("32", "32-true", 32):
        return MixedPrecisionPolicy()
    if precision not in _PRECISIONS:
        raise InvalidArgumentError(
            f"precision={precision!r} for FSDP: use 'bf16-mixed', '16-mixed', '32' or a "
            f"torch.distributed.fsdp.MixedPrecisionPolicy"
        )
    import torch

    # Compute in low precision, reduce gradients in fp32 (the usual accuracy trade-off).
    return MixedPrecisionPolicy(
        param_dtype=getattr(torch, _PRECISIONS[precision]), reduce_dtype=torch.float32
    )


def _units(root: Any, modules: Sequence[type] | None, min_params: int) -> list[Any]:
    """Submodules to shard on their own, children before parents (root excluded)."""
    chosen: list[Any] = []
    covered: set[int] = set()  # ids of parameters already in a chosen unit

    def visit(module: Any) -> None:
        for child in module.children():
            visit(child)
        if module is root:
            return
        if modules is not None:
            matches = isinstance(module, tuple(modules))  # classes checked by shard_model
            if matches:
                chosen.append(module)
                covered.update(id(p) for p in module.parameters())
            return
        own = [p for p in module.parameters() if id(p) not in covered]
        if sum(p.numel() for p in own) >= min_params:
            chosen.append(module)
            covered.update(id(p) for p in own)

    visit(root)
    return chosen


def shard_model(
    model: Any,
    *,
    modules: Iterable[type] | None = None,
    min_params: int = FSDP_MIN_PARAMS,
    precision: Any = None,
    cpu_offload: bool = False,
    reshard_after_forward: bool = True,
) -> Any:
    """Shard ``model`` over all ranks with FSDP2, in place; returns the same object.

    Args:
        model: A ``torch.nn.Module``; moved to :func:`devlayer.device` first.
        modules: Module classes to shard as units (e.g. the transformer block class);
            default: by size, see ``min_params``.
        min_params: Size threshold of the default policy.
        precision: ``None``/``"32"`` (fp32), ``"bf16-mixed"``, ``"16-mixed"`` or a
            ``MixedPrecisionPolicy``: the dtype of the gathered parameters (and so of the
            compute); gradients are reduced in fp32.
        cpu_offload: Keep sharded parameters, gradients and optimizer state in CPU memory
            between uses (for accelerators; refused on the cpu backend, where they are
            already there).
        reshard_after_forward: Free gathered parameters after forward (less memory) or keep
            them for backward (less communication).

    Returns:
        ``model``, now an ``FSDPModule`` whose parameters are ``DTensor`` shards; at world
        size 1 (no process group) the plain model, as DDP does there.

    Raises:
        InvalidArgumentError: Bad ``modules``/``min_params``/``precision``, a backend
            that runs one process only (mps), or ``cpu_offload`` on the cpu backend.
    """
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard

    import devlayer

    if isinstance(model, FSDPModule):
        return model
    classes = tuple(modules) if modules is not None else None
    if classes is not None and not all(
        isinstance(c, type) and issubclass(c, torch.nn.Module) for c in classes
    ):
        raise InvalidArgumentError(f"modules={modules!r}: expected torch.nn.Module classes")
    if isinstance(min_params, bool) or not isinstance(min_params, int) or min_params < 1:
        raise InvalidArgumentError(f"min_params={min_params!r} must be an int >= 1")
    st = devlayer.state()
    backend = devlayer.backends.get_backend(st.backend)
    if not backend.multi_process:
        raise InvalidArgumentError(
            f"strategy='fsdp' shards a model over several ranks, but the {st.backend!r} "
            f"backend runs one process only; use strategy='ddp' (the default) there"
        )
    if cpu_offload and st.device.type == "cpu":
        raise InvalidArgumentError(
            "cpu_offload=True moves shards to CPU memory, but this rank computes on the CPU "
            "already; leave it off on the cpu backend"
        )
    mp_policy = _mixed_precision(precision)  # checked at every world size
    if st.device.type == "cpu":
        _fixed_mmap_threshold()
    model.to(st.device)
    if st.world_size == 1:
        return model  # nothing to shard across, and no process group (as DDP at world 1)
    mesh = init_device_mesh(st.device.type, (st.world_size,))
    options: dict[str, Any] = {
        "mesh": mesh,
        "mp_policy": mp_policy,
        "reshard_after_forward": reshard_after_forward,
    }
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    for unit in _units(model, classes, min_params):
        fully_shard(unit, **options)
    fully_shard(model, **options)
    return model


#: glibc's M_MMAP_THRESHOLD parameter of mallopt(3), and the value we pin it to (its
#: documented default before the dynamic adjustment).
_M_MMAP_THRESHOLD, _MMAP_THRESHOLD = -3, 128 * 1024


def _fixed_mmap_threshold() -> bool:
    """Stop glibc from keeping FSDP's freed gather buffers in the heap (CPU shards).

    FSDP allocates and frees a unit-sized buffer per all-gather. glibc raises its mmap
    threshold each time a large mmapped block is freed, after which such buffers come from
    the heap and are not given back: a 50 M-parameter model on two ranks peaked at 1.8 GB of
    RSS per rank instead of 0.76 GB (``python -m benchmarks.run --only fsdp``). Pinning the
    threshold, as ``MALLOC_MMAP_THRESHOLD_=131072`` would, keeps large buffers in mmap.
    Skipped when that variable is set or the C library is not glibc.
    """
    import ctypes
    import os
    import platform

    if "MALLOC_MMAP_THRESHOLD_" in os.environ or platform.libc_ver()[0] != "glibc":
        return False
    try:
        return bool(ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def is_sharded(model: Any) -> bool:
    """True when ``model`` was sharded by :func:`shard_model` (an ``FSDPModule``)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(model, FSDPModule)


def local_numel(model: Any) -> int:
    """Parameter elements this rank holds (its shards; the whole model when not sharded)."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel()
    return total


def parameter_names(model: Any) -> dict[int, str]:
    """``id(parameter) -> name`` of ``model``'s parameters (taken before sharding)."""
    return {id(p): name for name, p in model.named_parameters()}


def rebind_optimizer(optimizer: Any, names: Mapping[int, str], model: Any) -> None:
    """Point ``optimizer`` at ``model``'s parameters after sharding replaced them.

    ``fully_shard`` swaps each parameter for a ``DTensor`` shard, so an optimizer built
    before it holds the old tensors and would step nothing. The Trainer receives such an
    optimizer; its param groups (and their options) are kept, each parameter is replaced
    by the sharded one of the same name.

    Args:
        optimizer: Built over the model's parameters before sharding, not stepped yet.
        names: :func:`parameter_names` of the model before sharding.
        model: The sharded model.

    Raises:
        InvalidArgumentError: The optimizer already holds state, or holds a parameter that
            is not the model's.
    """
    if optimizer.state:
        raise InvalidArgumentError(
            f"the optimizer already holds state for {len(optimizer.state)} parameter(s), "
            "but strategy='fsdp' replaces the parameters with shards; build the optimizer "
            "fresh and load its state through the Trainer's checkpoints (resume=...)"
        )
    current = dict(model.named_parameters())
    for group in optimizer.param_groups:
        rebound = []
        for p in group["params"]:
            name = names.get(id(p))
            if name is None or name not in current:
                raise InvalidArgumentError(
                    f"the optimizer holds a parameter of shape {tuple(p.shape)} that is not "
                    "one of the model's; build it from model.parameters()"
                )
            rebound.append(current[name])
        group["params"] = rebound


@contextlib.contextmanager
def skip_grad_sync(model: Any) -> Iterator[None]:
    """Accumulate gradients locally in this block (DDP ``no_sync`` or FSDP2's switch).

    Under FSDP the unsharded gradients stay on each rank until a backward outside the
    block reduce-scatters them all at once; a plain model (world size 1) needs nothing.
    """
    model = getattr(model, "_orig_mod", model)  # under torch.compile
    if is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield


def full_state_dict(model: Any) -> dict[str, Any]:
    """The plain model's complete ``state_dict`` on CPU, on rank 0 (collective when sharded).

    Under FSDP every rank must call it: the shards are gathered piece by piece into rank 0's
    CPU memory (other ranks get ``{}``), so no device ever holds the full model. For an
    unsharded model (DDP or one rank) it is the module's own ``state_dict`` on CPU.
    """
    model = getattr(model, "_orig_mod", model)  # under torch.compile
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return dict(get_model_state_dict(model, options=options))
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    return {k: v.detach().cpu() for k, v in inner.state_dict().items()}
