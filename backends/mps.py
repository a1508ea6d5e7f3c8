"""Apple silicon GPUs through Metal (MPS): one process, comm ``gloo`` for CPU objects."""

from __future__ import annotations

from devlayer.vendor import Backend, Runtime


class MpsRuntime(Runtime):
    """Asks ``torch.backends.mps``; there is exactly one MPS device when it exists."""

    def compiled(self) -> bool:
        import torch

        return bool(torch.backends.mps.is_built())

    def device_count(self) -> int:
        import torch

        return 1 if torch.backends.mps.is_available() else 0

    def set_device(self, index: int) -> None:
        return None  # a single device; nothing to select

    def device_name(self, index: int) -> str:
        return "Apple MPS"


class MpsBackend(Backend):
    """Apple GPUs. Single process: gloo cannot move MPS tensors between ranks."""

    name = "mps"
    priority = 50
    device_type = "mps"
    comms = ()  # gloo cannot move MPS tensors between ranks: one process only

    def make_runtime(self) -> Runtime:
        return MpsRuntime()

    def hint(self, comm: str | None = None) -> str:
        if comm is None:
            return "MPS needs macOS 12.3+ on Apple silicon with an arm64 torch build."
        return super().hint(comm)
