"""``prepare_model``: the model on this rank's device, wrapped in DDP when there are peers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# DDP's defaults and unwrap live with the strategies, which wrap; named here as before.
from devlayer.train.strategy import DDP_DEFAULTS, Strategy, from_name, unwrap

__all__ = ["DDP_DEFAULTS", "prepare_model", "unwrap"]


def prepare_model(
    model: Any,
    strategy: str | Strategy = "ddp",
    *,
    fsdp: Mapping[str, Any] | None = None,
    **ddp_kwargs: Any,
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
        strategy: ``"ddp"`` (replicas, the default), ``"fsdp"`` (shards) or a
            :class:`~devlayer.train.strategy.Strategy` object.
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
    chosen = from_name(strategy, fsdp=fsdp, ddp=ddp_kwargs)  # the options checked there
    if not devlayer.is_initialized():
        devlayer.init()
    return chosen.wrap(model)
