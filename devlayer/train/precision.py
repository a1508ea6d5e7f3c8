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
import os
from collections.abc import Iterable, Mapping
from typing import Any

from devlayer.errors import DevlayerError, InvalidArgumentError

__all__ = ["Precision", "resolve_precision"]

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

    Args:
        precision: A name :func:`resolve_precision` accepts (already resolved is fine).
        device: The device training runs on.

    Raises:
        DevlayerError: The device cannot autocast to the requested dtype.
    """

    def __init__(self, precision: str, device: Any) -> None:
        import torch

        self.name = resolve_precision(precision)
        self.device = device
        #: ``torch.bfloat16`` / ``torch.float16`` under mixed precision, else ``None``.
        self.dtype: Any = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(self.name)
        if self.dtype is not None:
            self._check_device(torch)
        #: The ``torch.amp.GradScaler`` for fp16 (``None`` otherwise).
        self.scaler: Any = torch.amp.GradScaler(device.type) if self.name == "16-mixed" else None

    def _check_device(self, torch: Any) -> None:
        dev = self.device.type
        try:
            with torch.autocast(device_type=dev, dtype=self.dtype):
                probe = torch.nn.functional.linear(
                    torch.ones(2, 2, device=self.device), torch.ones(2, 2, device=self.device)
                )
            ok = probe.dtype == self.dtype
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
