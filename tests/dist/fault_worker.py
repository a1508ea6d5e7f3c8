"""One rank of a deliberately broken job, started as a plain process by tests/dist/test_faults.py.

The test sets ``RANK``, ``WORLD_SIZE``, ``MASTER_PORT`` (no torchrun). Usage::

    python fault_worker.py raise        # F4: rank 1 raises while rank 0 waits in all_reduce
    python fault_worker.py late SECONDS # F5: rank 1 reaches the barrier SECONDS late
    python fault_worker.py join T0 T1   # B9: rendezvous only, rank r with timeout T<r> seconds

Every mode prints ``READY rank=<r>`` once ``init()`` returned, so the test can tell a
rendezvous failure from a collective one. Errors are not caught: the traceback goes to
stderr and the exit code is 1, as in a user's script.
"""

from __future__ import annotations

import os
import sys
import time

import torch

import devlayer

TIMEOUT = 5.0  # collective and rendezvous timeout of every mode but "join"


def main(mode: str, *args: str) -> None:
    if mode == "join":
        rank = int(os.environ["RANK"])
        with devlayer.init(backend="cpu", timeout=float(args[rank])):
            print(f"READY rank={devlayer.rank()}", flush=True)
        return
    with devlayer.init(backend="cpu", timeout=TIMEOUT):
        rank = devlayer.rank()
        print(f"READY rank={rank}", flush=True)
        if mode == "raise":
            if rank == 1:
                raise ValueError("rank 1 fails on purpose before the all_reduce")
            devlayer.all_reduce(torch.ones(4))
        elif mode == "late":
            if rank == 1:
                time.sleep(float(args[0]))
            devlayer.barrier(timeout=TIMEOUT)
        else:
            raise SystemExit(f"unknown mode {mode!r}")
        print(f"DONE rank={rank}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
