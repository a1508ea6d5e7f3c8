"""devlayer: one PyTorch script on CUDA, ROCm, Intel XPU, MPS and CPU, under any launcher.

Importing devlayer is cheap: it imports neither torch nor any backend, probes no hardware
and changes no environment variable. Names are loaded on first use.

Example:
    >>> import devlayer
    >>> st = devlayer.init()            # reads torchrun / srun / mpirun / accelerate env
    >>> x = devlayer.all_reduce({"loss": 1.0}, op="mean")
    >>> devlayer.shutdown()
    True
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from devlayer._version import __version__
from devlayer.errors import BackendUnavailableError, CollectiveError, DevlayerError

if TYPE_CHECKING:
    from devlayer.comm import (
        all_gather,
        all_gather_object,
        all_reduce,
        barrier,
        broadcast,
        broadcast_object,
    )
    from devlayer.launchers import launched
    from devlayer.lifecycle import (
        State,
        accelerator_module,
        backend,
        device,
        init,
        is_initialized,
        is_local_main,
        is_main,
        local_rank,
        local_world_size,
        node_rank,
        num_nodes,
        rank,
        shutdown,
        state,
        world_size,
    )
    from devlayer.multiproc import RankFailedError, spawn
    from devlayer.train import Trainer, prepare_loader, prepare_model


# name -> module that defines it; resolved on first attribute access (PEP 562).
_LAZY = {
    **dict.fromkeys(
        (
            "State",
            "accelerator_module",
            "backend",
            "device",
            "init",
            "is_initialized",
            "is_local_main",
            "is_main",
            "local_rank",
            "local_world_size",
            "node_rank",
            "num_nodes",
            "rank",
            "shutdown",
            "state",
            "world_size",
        ),
        "devlayer.lifecycle",
    ),
    **dict.fromkeys(
        (
            "all_gather",
            "all_gather_object",
            "all_reduce",
            "barrier",
            "broadcast",
            "broadcast_object",
        ),
        "devlayer.comm",
    ),
    **dict.fromkeys(("spawn", "RankFailedError"), "devlayer.multiproc"),
    "launched": "devlayer.launchers",
    **dict.fromkeys(("prepare_model", "prepare_loader", "Trainer"), "devlayer.train"),
}


#: The public names: the version, the errors users catch (imported above, they cost nothing)
#: and the lazy table. One list; docs/api.md's table and the generated reference
#: (docs/reference/devlayer.md) are checked against it (tests/unit/test_rules.py,
#: tests/unit/test_docs_site.py).
__all__ = [
    "__version__",
    "DevlayerError",
    "BackendUnavailableError",
    "CollectiveError",
    *_LAZY,
]

# Public submodules, imported on first attribute access (``devlayer.launchers.detect(env)``
# works after a plain ``import devlayer``). Not in __all__ or dir(): listing the package must
# not import them (``devlayer.early`` applies DEVLAYER_DEVICES when imported).
_SUBMODULES = frozenset(
    (
        "backends",
        "cli",
        "comm",
        "devices",
        "early",
        "errors",
        "farm",
        "launchers",
        "testing",
        "train",
    )
)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"devlayer.{name}")  # the import binds the attribute
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'devlayer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
