"""Mixed precision for the Trainer: names, autocast, and the fp16 gradient scaler.

``precision`` names follow Lightning and Accelerate (``"32"``, ``"bf16-mixed"``,
``"16-mixed"`` and their aliases). :class:`Precision` holds what one run decided: the
autocast dtype, whether this device supports it (checked once, with a clear error) and the
``GradScaler`` that fp16 needs. The optimizer step goes through :meth:`Precision.step`, so
unscaling before clipping and skipping steps with inf/NaN gradients happen in one place.

Example:
    >>> resolve_precision("bf16")
    'bf16-mixed'
    >>> import torch
    >>> p = Precision("32", torch.device("cpu"))
    >>> (p.dtype, p.scaler)
    (None, None)
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from devlayer.errors import DevlayerError, InvalidArgumentError

__all__ = ["Precision", "ShardedGradScaler", "resolve_precision"]

_PRECISIONS = {
    "32": "32",
    "32-true": "32",
    "fp32": "32",
    "no": "32",
    "float32": "32",
    "bf16": "bf16-mixed",
    "bf16-mixed": "bf16-mixed",
    "bfloat16": "bf16-mixed",
    "16": "16-mixed",
    "16-mixed": "16-mixed",
    "fp16": "16-mixed",
    "float16": "16-mixed",
}


def resolve_precision(precision: str | None, env: Mapping[str, str] | None = None) -> str:
    """Normalize a precision name; ``None`` reads ``ACCELERATE_MIXED_PRECISION`` or gives "32".

    Example:
        >>> resolve_precision("bf16")
        'bf16-mixed'
        >>> resolve_precision(None, {"ACCELERATE_MIXED_PRECISION": "fp16"})
        '16-mixed'

    """
    origin = "precision"
    if precision is None:
        env = os.environ if env is None else env
        precision = env.get("ACCELERATE_MIXED_PRECISION") or "32"
        origin = "ACCELERATE_MIXED_PRECISION"
    key = str(precision).strip().lower()
    if key not in _PRECISIONS:
        raise InvalidArgumentError(
            f"{origin}={precision!r} is not supported; use '32', 'bf16-mixed' or '16-mixed'"
        )
    return _PRECISIONS[key]


class Precision:
    """One run's precision: autocast dtype, device check and (fp16 only) the grad scaler.

    The strategy decides the policy (:meth:`devlayer.train.strategy.Strategy.precision`):
    FSDP casts the gathered parameters itself (no autocast) and scales fp16 losses with a
    :class:`ShardedGradScaler`, which all ranks agree on.

    Args:
        precision: A name :func:`resolve_precision` accepts (already resolved is fine).
        device: The device training runs on.
        autocast: Run the forward under ``torch.autocast`` at low precision (False: the
            model's wrapper casts, the device is still checked).
        scaler: fp16's loss scaler class (default ``torch.amp.GradScaler`` for the
            device type).

    Raises:
        DevlayerError: The device cannot compute in the requested dtype.
    """

    def __init__(
        self,
        precision: str,
        device: Any,
        *,
        autocast: bool = True,
        scaler: Callable[[], Any] | None = None,
    ) -> None:
        import torch

        self.name = resolve_precision(precision)
        self.device = device
        low = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(self.name)
        if low is not None:
            self._check_device(torch, low)
        #: The autocast dtype (``None``: full precision, or a wrapper that casts itself).
        self.dtype: Any = low if autocast else None
        #: fp16's loss scaler (``torch.amp.GradScaler`` unless ``scaler`` names another);
        #: ``None`` at other precisions.
        self.scaler: Any = None
        if self.name == "16-mixed":
            make = scaler or functools.partial(torch.amp.GradScaler, device.type)
            self.scaler = make()

    def _check_device(self, torch: Any, low: Any) -> None:
        dev = self.device.type
        try:
            with torch.autocast(device_type=dev, dtype=low):
                probe = torch.nn.functional.linear(
                    torch.ones(2, 2, device=self.device), torch.ones(2, 2, device=self.device)
                )
            ok = probe.dtype == low
        except (RuntimeError, AssertionError) as exc:
            ok, why = False, str(exc).splitlines()[0]
        else:
            why = f"autocast produced {probe.dtype}"
        if not ok:
            raise DevlayerError(
                f"precision={self.name!r} is not supported on {dev} with torch "
                f"{torch.__version__} ({why}); use precision='32' or 'bf16-mixed'"
            )

    def autocast(self) -> Any:
        """The forward pass's autocast context (a no-op context at full precision)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        import torch

        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def scale(self, loss: Any) -> Any:
        """The loss to call ``backward()`` on (scaled under fp16)."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def step(self, optimizer: Any, parameters: Iterable[Any], clip_grad: float | None) -> None:
        """Clip (after unscaling) and step; under fp16 a step with inf/NaN grads is skipped.

        Works for sharded (FSDP2 ``DTensor``) parameters too: torch's ``clip_grad_norm_``
        computes the global norm over the shards.
        """
        import torch

        if isinstance(self.scaler, ShardedGradScaler):
            params = list(parameters)
            finite = self.scaler.unscale(params)
            if finite:
                if clip_grad is not None:
                    torch.nn.utils.clip_grad_norm_(params, clip_grad)
                optimizer.step()
            self.scaler.update(finite)
            return
        if self.scaler is not None:
            if clip_grad is not None:
                self.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(list(parameters), clip_grad)
            self.scaler.step(optimizer)
            self.scaler.update()
            return
        if clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(list(parameters), clip_grad)
        optimizer.step()

    def state_dict(self) -> dict[str, Any] | None:
        """The scaler's state for checkpoints (``None`` without a scaler)."""
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Restore the scaler's state (ignored without a scaler or a saved state)."""
        if self.scaler is not None and state is not None:
            self.scaler.load_state_dict(state)


class ShardedGradScaler:
    """fp16 loss scaling for sharded gradients, with one decision for all ranks.

    ``torch.amp.GradScaler`` checks only the gradients this process holds. With FSDP each
    rank holds a different shard, so one rank could find an inf and skip the step while
    another steps: the shards would silently stop belonging to one model. Here the
    "found inf" flag is all-reduced (MAX, one integer) before anyone steps, so every rank
    skips the same steps and keeps the same scale. The rules are ``GradScaler``'s: start
    at 2**16, halve on inf/NaN, double after ``growth_interval`` finite steps in a row.

    Example:
        >>> scaler = ShardedGradScaler(init_scale=8.0)
        >>> scaler.update(False); scaler.get_scale()
        4.0
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ) -> None:
        self._scale = float(init_scale)
        self._growth_tracker = 0
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval = growth_interval

    def get_scale(self) -> float:
        """The current loss scale."""
        return self._scale

    def scale(self, loss: Any) -> Any:
        """``loss`` times the scale (call ``backward()`` on it)."""
        return loss * self._scale

    def unscale(self, parameters: list[Any]) -> bool:
        """Divide the gradients by the scale; False on every rank when any rank saw inf/NaN.

        A collective: every rank calls it at every optimizer step.
        """
        import torch

        from devlayer.comm import all_reduce

        local = [_local(p.grad) for p in parameters if p.grad is not None]
        # One flag on the device (no sync per gradient), one collective, one read.
        flags = [(~torch.isfinite(g)).any() for g in local]
        found = (
            torch.stack(flags).any().to(torch.int32)
            if flags
            else torch.zeros((), dtype=torch.int32)
        )
        if all_reduce(found, op="max").item():
            return False
        for g in local:
            g.mul_(1.0 / self._scale)
        return True

    def update(self, finite: bool) -> None:
        """Back off after a skipped step; grow after ``growth_interval`` good ones."""
        if not finite:
            self._scale *= self.backoff_factor
            self._growth_tracker = 0
            return
        self._growth_tracker += 1
        if self._growth_tracker >= self.growth_interval:
            self._scale *= self.growth_factor
            self._growth_tracker = 0

    def state_dict(self) -> dict[str, Any]:
        """Scale and growth tracker as plain values (for checkpoints)."""
        return {"scale": self._scale, "growth_tracker": self._growth_tracker}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` gave."""
        self._scale = float(state["scale"])
        self._growth_tracker = int(state["growth_tracker"])


def _local(tensor: Any) -> Any:
    """This rank's part of a ``DTensor`` (a plain tensor is all of itself)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
