"""Pieces the built-in runtimes share (no vendor calls here)."""

from __future__ import annotations


def comm_available(comm: str) -> bool:
    """Whether torch.distributed has the process-group backend ``comm``."""
    import torch.distributed as dist

    if not dist.is_available():
        return False
    checks = {
        "gloo": dist.is_gloo_available,
        "nccl": dist.is_nccl_available,
        "mpi": dist.is_mpi_available,
        "xccl": getattr(dist, "is_xccl_available", lambda: False),
        "ucc": getattr(dist, "is_ucc_available", lambda: False),
    }
    check = checks.get(comm)
    if check is not None:
        return bool(check())
    # Plugins (oneCCL's "ccl", vendor libraries) register themselves with torch.
    return comm in dist.Backend.backend_list
