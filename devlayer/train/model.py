"""``prepare_model``: the model on this rank's device, wrapped in DDP when there are peers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["DDP_DEFAULTS", "prepare_model", "unwrap"]

#: Defaults devlayer passes to DistributedDataParallel (each can be overridden):
#: ``gradient_as_bucket_view`` lets gradients live in DDP's communication buckets, which
#: saves one gradient-sized copy per step and memory.
DDP_DEFAULTS: dict[str, Any] = {"gradient_as_bucket_view": True}


def prepare_model(
    model: Any, strategy: str = "ddp", *, fsdp: Mapping[str, Any] | None = None, **ddp_kwargs: Any
) -> Any:
    """Move ``model`` to :func:`devlayer.device` and wrap it for data parallel training.

    The module is moved in place (``model.to``), so the caller's object holds the trained
    weights; DDP wraps it and never copies it. At world size 1 the plain model is returned.

    With ``strategy="fsdp"`` the model is sharded instead (FSDP2, on every backend that runs
    several processes): each rank keeps about 1/world of the parameters, gradients and
    optimizer state. Build the optimizer *after* this call, from the returned model's
    parameters. See :func:`devlayer.train.fsdp.shard_model` for the ``fsdp`` options
    (``modules``, ``min_params``, ``precision``, ``cpu_offload``, ``reshard_after_forward``).

    Args:
        model: A ``torch.nn.Module``.
        strategy: ``"ddp"`` (replicas, the default) or ``"fsdp"`` (shards).
        fsdp: Options for :func:`~devlayer.train.fsdp.shard_model` (``strategy="fsdp"``).
        **ddp_kwargs: Passed to ``DistributedDataParallel`` on top of :data:`DDP_DEFAULTS`
            (``device_ids`` is set for indexed accelerators only).

    Returns:
        The DDP-wrapped model, ``model`` itself at world size 1, or ``model`` sharded in
        place (an ``FSDPModule``) with ``strategy="fsdp"`` at world size > 1.

    Example:
        >>> import torch, devlayer
        >>> _ = devlayer.init(backend="cpu")
        >>> net = torch.nn.Linear(2, 1)
        >>> devlayer.prepare_model(net) is net
        True
        >>> _ = devlayer.shutdown()
    """
    import torch

    import devlayer
    from devlayer.errors import InvalidArgumentError

    if not isinstance(model, torch.nn.Module):
        raise InvalidArgumentError(
            f"prepare_model() takes a torch.nn.Module, got {type(model).__name__}"
        )
    if strategy not in ("ddp", "fsdp"):
        raise InvalidArgumentError(f"strategy={strategy!r}: use 'ddp' or 'fsdp'")
    if strategy == "ddp" and fsdp is not None:
        raise InvalidArgumentError("fsdp= options need strategy='fsdp'")
    if strategy == "fsdp" and ddp_kwargs:
        raise InvalidArgumentError(
            f"DistributedDataParallel options {sorted(ddp_kwargs)} with strategy='fsdp'; "
            f"pass FSDP options as fsdp={{...}}"
        )
    if not devlayer.is_initialized():
        devlayer.init()
    if strategy == "fsdp":
        from devlayer.train.fsdp import shard_model

        return shard_model(model, **dict(fsdp or {}))  # checks first, then moves the model
    st = devlayer.state()
    model.to(st.device)
    if st.world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return model
    kwargs = {**DDP_DEFAULTS, **ddp_kwargs}
    if st.device_index is not None:
        kwargs.setdefault("device_ids", [st.device_index])
        kwargs.setdefault("output_device", st.device_index)
    return DistributedDataParallel(model, **kwargs)


def unwrap(model: Any) -> Any:
    """The user's module inside a DDP (or compiled) wrapper; an FSDP model is its own."""
    inner = getattr(model, "module", model)
    return getattr(inner, "_orig_mod", inner)
