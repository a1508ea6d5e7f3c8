"""Intel GPUs: native ``torch.xpu`` with comm ``xccl`` (torch >= 2.8), or IPEX + oneCCL ``ccl``.

Order of preference, decided without creating a device context:

1. torch built with XPU and ``torch.distributed.is_xccl_available()`` -> comm ``xccl``.
2. ``oneccl_bindings_for_pytorch`` installed -> comm ``ccl``; :meth:`XpuBackend.prepare`
   imports torch, then ``intel_extension_for_pytorch``, then the bindings (the order the
   bindings require), before the process group is created.
3. Neither -> :class:`~devlayer.errors.BackendUnavailableError` naming what to install.
   There is never a silent fallback to gloo or nccl.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping, MutableMapping

from devlayer.errors import BackendUnavailableError
from devlayer.hooks import CommNetwork, register_comm_network
from devlayer.launchers import ProcessInfo
from devlayer.registry import torch_comm_available
from devlayer.vendor import Availability, Backend, Runtime

from . import _ipex
from ._ipex import IPEX_DIST, IPEX_MODULE, minor, mismatch
from ._ipex import installed_version as _version

CCL_MODULE = "oneccl_bindings_for_pytorch"
CCL_DIST = "oneccl_bind_pt"

# For `devlayer doctor`'s hints: xccl is oneCCL too, steered by the same CCL_* variables.
register_comm_network("xccl", CommNetwork("CCL_"))
register_comm_network("ccl", CommNetwork("CCL_"))


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


class XpuRuntime(Runtime):
    """Asks ``torch.xpu`` (device counts via Level Zero sysman before initialization)."""

    def compiled(self) -> bool:
        import torch

        xpu = getattr(torch, "xpu", None)
        return bool(xpu is not None and xpu._is_compiled())

    def device_count(self) -> int:
        import torch

        return int(torch.xpu.device_count()) if self.compiled() else 0

    def is_initialized(self) -> bool:
        import torch

        return bool(self.compiled() and torch.xpu.is_initialized())

    def set_device(self, index: int) -> None:
        import torch

        torch.xpu.set_device(index)

    def device_name(self, index: int) -> str:
        import torch

        return str(torch.xpu.get_device_name(index))

    def comm_available(self, comm: str) -> bool:
        # torch learns of "ccl" only when the oneCCL bindings are imported (in prepare).
        if comm == "ccl":
            return _installed(CCL_MODULE) or torch_comm_available("ccl")
        return torch_comm_available(comm)


class XpuBackend(Backend):
    """Intel Data Center / Arc GPUs. Visibility through ``ZE_AFFINITY_MASK``."""

    name = "xpu"
    priority = 90
    device_type = "xpu"
    visibility_vars = ("ZE_AFFINITY_MASK", "ONEAPI_DEVICE_SELECTOR")
    # torch maps xpu to xccl (torch >= 2.8); older torch needs IPEX + oneCCL's "ccl".
    comms = ("xccl", "ccl")

    def make_runtime(self) -> Runtime:
        return XpuRuntime()

    def availability(self, runtime: Runtime) -> Availability:
        if not runtime.compiled():
            why = "torch built without XPU"
            if _installed(IPEX_MODULE):
                why += " (intel_extension_for_pytorch is installed but torch has no XPU)"
            return Availability(False, why)
        count = runtime.device_count()
        if count < 1:
            return Availability(False, "no XPU devices visible (check the driver and sycl-ls)")
        return Availability(True, f"{count} xpu device(s)")

    def hint(self, comm: str | None = None) -> str:
        if comm is None:
            return (
                "Install torch >= 2.8 built for XPU (PyTorch's XPU wheel index) and the Intel "
                "GPU driver; check with `sycl-ls`. See docs/intel.md."
            )
        import torch

        return (
            f"torch {torch.__version__} has no xccl; install torch >= 2.8 built for XPU "
            f"(it ships xccl), or for older torch install {IPEX_DIST} and {CCL_DIST} "
            f"of the same minor version as torch ({minor(torch.__version__)}.*)"
        )

    def notes(self, env: Mapping[str, str], *, selected: bool) -> list[str]:
        out = []
        if selected:
            mode = env.get("ZE_FLAT_DEVICE_HIERARCHY", "FLAT (default)")
            out.append(
                f"ZE_FLAT_DEVICE_HIERARCHY={mode}: in FLAT mode every tile is its own xpu "
                f"device (a 2-tile GPU counts as 2); COMPOSITE shows one device per card"
            )
        ipex = _version(IPEX_DIST)
        if ipex is not None:
            import torch

            why = mismatch(ipex, torch.__version__)
            if why is not None:
                out.append(why)
        return out

    def prepare(
        self,
        comm: str,
        process: ProcessInfo | None = None,
        env: MutableMapping[str, str] | None = None,
    ) -> None:
        """For ``ccl``: oneCCL's local rank variables, then IPEX and the bindings, in order.

        oneCCL reads its local rank and size from CCL_LOCAL_RANK/CCL_LOCAL_SIZE. torchrun
        and SLURM do not set them; without them oneCCL may guess from MPI variables that
        are absent and place ranks wrongly. They are set from the launcher's local
        rank/size, only when the user has not, before the bindings load oneCCL. Then
        torch, ``intel_extension_for_pytorch`` and the bindings are imported in the order
        the bindings require.
        """
        if comm != "ccl":
            return
        if process is not None and env is not None:
            env.setdefault("CCL_LOCAL_RANK", str(process.local_rank))
            env.setdefault("CCL_LOCAL_SIZE", str(process.local_world_size))
        if _ipex.installed_version(IPEX_DIST) is not None:
            _ipex.import_ipex("comm 'ccl'")  # version check first, then the import
        try:
            importlib.import_module(CCL_MODULE)
        except ImportError as exc:
            raise BackendUnavailableError(
                f"comm 'ccl' needs {CCL_MODULE} ({CCL_DIST}): {exc}; {self.hint(comm)}"
            ) from exc
