"""NVIDIA CUDA and AMD ROCm (HIP builds of torch expose the same ``torch.cuda`` module)."""

from __future__ import annotations

from collections.abc import Mapping

from devlayer.hooks import (
    CommNetwork,
    FlightRecorder,
    register_comm_network,
    register_flight_recorder,
)
from devlayer.vendor import Backend, Runtime

# For `devlayer doctor`'s hints when a collective fails (RCCL reads the same NCCL_* names).
register_comm_network("nccl", CommNetwork("NCCL_", "NCCL_SOCKET_IFNAME"))
# torch's flight recorder for nccl, for devlayer's hang reports: the names torch 2.13 reads
# (torch/csrc/distributed/c10d/FlightRecorder*.{hpp,cpp}, ProcessGroupNCCL.hpp), newest
# first; 2000 entries is torch's own default in recent releases, Python stacks only
# (TORCH_FR_CPP_STACK, C++ stacks, stays off: the costly part). The file is prefix + rank.
register_flight_recorder(
    "nccl",
    FlightRecorder(
        settings=(
            (("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE"), "2000"),
            (("TORCH_NCCL_DUMP_ON_TIMEOUT",), "1"),
        ),
        file_vars=("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"),
    ),
)


class CudaRuntime(Runtime):
    """Asks ``torch.cuda``; device counts come from NVML / AMD SMI before initialization."""

    bind_device_id = True  # device_id to init_process_group: eager NCCL init (gloo binds too)

    def __init__(self) -> None:
        import torch

        self.variant = "rocm" if getattr(torch.version, "hip", None) else "cuda"

    def compiled(self) -> bool:
        import torch

        return bool(torch.cuda._is_compiled())

    def device_count(self) -> int:
        import torch

        # torch.cuda.device_count() uses NVML (AMD SMI on ROCm) until CUDA is initialized,
        # so it does not freeze CUDA_VISIBLE_DEVICES; torch.cuda.is_available() would.
        return int(torch.cuda.device_count())

    def is_initialized(self) -> bool:
        import torch

        return bool(torch.cuda.is_initialized())

    def set_device(self, index: int) -> None:
        import torch

        torch.cuda.set_device(index)

    def device_name(self, index: int) -> str:
        import torch

        return str(torch.cuda.get_device_name(index))


class CudaBackend(Backend):
    """NVIDIA GPUs (comm ``nccl``) and AMD GPUs with a ROCm build (comm ``nccl`` = RCCL)."""

    name = "cuda"
    priority = 100
    device_type = "cuda"
    visibility_vars = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")
    # NCCL refuses two ranks on one GPU ("Duplicate GPU detected") in most versions;
    # gloo on CUDA tensors does not care.
    exclusive_comms = ("nccl",)

    def make_runtime(self) -> Runtime:
        return CudaRuntime()

    def visibility_var(self, env: Mapping[str, str], runtime: Runtime) -> str | None:
        # ROCm honours HIP_VISIBLE_DEVICES (and CUDA_VISIBLE_DEVICES) on top of
        # ROCR_VISIBLE_DEVICES; narrow the one the user or scheduler already set.
        if runtime.variant == "rocm":
            for var in ("HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"):
                if env.get(var, "").strip():
                    return var
            return "HIP_VISIBLE_DEVICES"
        return "CUDA_VISIBLE_DEVICES"

    def notes(self, env: Mapping[str, str], *, selected: bool) -> list[str]:
        out = []
        if "MIG-" in env.get("CUDA_VISIBLE_DEVICES", ""):
            out.append(
                "CUDA_VISIBLE_DEVICES names a MIG slice: a process sees one slice, and MIG is "
                "not multi-GPU (NCCL cannot span slices); run one process per slice or use "
                "full GPUs"
            )
        if env.get("CUDA_VISIBLE_DEVICES") and env.get("HIP_VISIBLE_DEVICES"):
            out.append(
                "CUDA_VISIBLE_DEVICES and HIP_VISIBLE_DEVICES are both set; on ROCm both "
                "apply, one after the other. Set only one of them"
            )
        return out

    def hint(self, comm: str | None = None) -> str:
        if comm is not None:
            return (
                f"{comm} ships with the CUDA/ROCm builds of torch; a CPU-only build cannot use "
                f"it. Install a CUDA build of torch, or run with DEVLAYER_BACKEND=cpu (gloo)"
            )
        return (
            "Install a CUDA (or ROCm) build of torch and check the GPUs with `nvidia-smi` / "
            "`rocm-smi` (and CUDA_VISIBLE_DEVICES, which hides GPUs when empty)."
        )
