"""The CPU: always there; comm ``gloo`` (or ``mpi`` when asked and torch has it)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from devlayer.registry import Availability, Backend, Runtime

from . import _ipex
from ._common import comm_available

if TYPE_CHECKING:
    import torch


class CpuRuntime:
    """The CPU has one device and nothing to initialize."""

    variant = ""

    def compiled(self) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def is_initialized(self) -> bool:
        return False

    def set_device(self, index: int) -> None:
        return None

    def device_name(self, index: int) -> str:
        import platform

        return platform.processor() or platform.machine() or "cpu"

    def comm_available(self, comm: str) -> bool:
        return comm_available(comm)


class CpuBackend(Backend):
    """Every rank on the CPU, talking over gloo. Ranks share the one CPU device."""

    name = "cpu"
    priority = 0
    device_type = "cpu"
    indexed = False

    def make_runtime(self) -> Runtime:
        return CpuRuntime()

    def availability(self) -> Availability:
        return Availability(True, "always available")

    def default_comm(self) -> str:
        return "gloo"

    def comm_hint(self, comm: str) -> str:
        if comm == "mpi":
            return "torch must be built from source against an MPI library to use 'mpi'; use gloo"
        return "use comm='gloo', which every torch build has"

    def optimize(self, model: Any, optimizer: Any, *, method: str, dtype: Any) -> tuple[Any, Any]:
        """``method="ipex"``: ``ipex.optimize`` with IPEX's CPU build (oneDNN fusions)."""
        if method != "ipex":
            return super().optimize(model, optimizer, method=method, dtype=dtype)
        return _ipex.optimize(model, optimizer, dtype)

    def device(self, index: int | None) -> torch.device:
        import torch

        return torch.device("cpu")
