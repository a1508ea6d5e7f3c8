"""The CPU: always there; comm ``gloo`` (or ``mpi`` when asked and torch has it)."""

from __future__ import annotations

from devlayer.vendor import Availability, Backend, Runtime

from . import _ipex  # noqa: F401  (registers optimize="ipex": IPEX has a CPU build)


class CpuRuntime(Runtime):
    """The CPU has one device and nothing to initialize."""

    def compiled(self) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def set_device(self, index: int) -> None:
        return None

    def device_name(self, index: int) -> str:
        import platform

        return platform.processor() or platform.machine() or "cpu"


class CpuBackend(Backend):
    """Every rank on the CPU, talking over gloo. Ranks share the one CPU device."""

    name = "cpu"
    priority = 0
    device_type = "cpu"

    def make_runtime(self) -> Runtime:
        return CpuRuntime()

    def availability(self, runtime: Runtime) -> Availability:
        return Availability(True, "always available")

    def hint(self, comm: str | None = None) -> str:
        if comm == "mpi":
            return "torch must be built from source against an MPI library to use 'mpi'; use gloo"
        if comm is not None:
            return "use comm='gloo', which every torch build has"
        return super().hint()
