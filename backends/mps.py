"""Apple silicon GPUs through Metal (MPS): one process, comm ``gloo`` for CPU objects."""

from __future__ import annotations

from typing import TYPE_CHECKING

from devlayer.registry import Backend, Runtime

from ._common import comm_available

if TYPE_CHECKING:
    import torch


class MpsRuntime:
    """Asks ``torch.backends.mps``; there is exactly one MPS device when it exists."""

    variant = ""

    def compiled(self) -> bool:
        import torch

        return bool(torch.backends.mps.is_built())

    def device_count(self) -> int:
        import torch

        return 1 if torch.backends.mps.is_available() else 0

    def is_initialized(self) -> bool:
        return False

    def set_device(self, index: int) -> None:
        return None  # a single device; nothing to select

    def device_name(self, index: int) -> str:
        return "Apple MPS"

    def comm_available(self, comm: str) -> bool:
        return comm_available(comm)


class MpsBackend(Backend):
    """Apple GPUs. Single process: gloo cannot move MPS tensors between ranks."""

    name = "mps"
    priority = 50
    device_type = "mps"
    indexed = False
    multi_process = False

    def make_runtime(self) -> Runtime:
        return MpsRuntime()

    def default_comm(self) -> str:
        return "gloo"

    def install_hint(self) -> str:
        return "MPS needs macOS 12.3+ on Apple silicon with an arm64 torch build."

    def device(self, index: int | None) -> torch.device:
        import torch

        return torch.device("mps")
