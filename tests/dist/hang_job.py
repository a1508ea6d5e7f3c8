"""A 2-rank job for the hang-report tests (issue 22), started under torchrun by the tests.

python hang_job.py MODE DIR|env; each rank prints ``RESULT {json}`` when it ends normally.

Modes:
    ok        no hang: rank 1 sends itself SIGUSR1 (a dump; its own handler also runs; the
              job goes on); the handlers are checked after shutdown().
    stuck     rank 1 loops in stuck_in_user_code() while rank 0 waits in all_reduce.
    exit0     rank 1 exits with code 0 before the all_reduce rank 0 waits in.
    mismatch  rank 0 calls barrier while rank 1 calls all_reduce at the same point.
    kill      rank 1 dies of SIGKILL before the all_reduce rank 0 waits in.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import torch

import devlayer

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def stuck_in_user_code() -> None:
    while True:
        time.sleep(0.05)


def ok(folder: str) -> dict[str, object]:
    seen: list[int] = []
    signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    before = {s: signal.getsignal(s) for s in SIGNALS}
    devlayer.init(backend="cpu", timeout=60, hang_dir=_folder(folder))
    installed = [signal.getsignal(s) is not before[s] for s in SIGNALS]
    for _ in range(3):
        devlayer.all_reduce(torch.ones(4))
    if devlayer.rank() == 1:
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.2)  # the handler runs at the next bytecode; the sleep is cut short
    devlayer.barrier()
    rank = devlayer.rank()
    devlayer.shutdown()
    restored = [signal.getsignal(s) is before[s] for s in SIGNALS]
    return {"rank": rank, "installed": installed, "restored": restored, "user_handler": seen}


def stuck(folder: str) -> None:
    devlayer.init(backend="cpu", timeout=8, hang_dir=_folder(folder))
    devlayer.all_reduce(torch.ones(4))
    if devlayer.rank() == 1:
        stuck_in_user_code()
    devlayer.all_reduce(torch.ones(4))


def exit0(folder: str) -> None:
    devlayer.init(backend="cpu", timeout=8, hang_dir=_folder(folder))
    devlayer.all_reduce(torch.ones(4))
    if devlayer.rank() == 1:
        sys.exit(0)
    devlayer.all_reduce(torch.ones(4))


def mismatch(folder: str) -> None:
    devlayer.init(backend="cpu", timeout=8, hang_dir=_folder(folder))
    devlayer.all_reduce(torch.ones(4))
    t = torch.ones(4)
    devlayer.barrier() if devlayer.rank() == 0 else devlayer.all_reduce(t)


def kill(folder: str) -> None:
    devlayer.init(backend="cpu", timeout=8, hang_dir=_folder(folder))
    devlayer.all_reduce(torch.ones(4))
    if devlayer.rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    devlayer.all_reduce(torch.ones(4))


def _folder(folder: str) -> str | None:
    """``env``: no ``hang_dir`` argument (DEVLAYER_HANG_DIR, e.g. from devlayer launch)."""
    return None if folder == "env" else folder


def main() -> None:
    mode, folder = sys.argv[1], sys.argv[2]
    modes = {"ok": ok, "stuck": stuck, "exit0": exit0, "mismatch": mismatch, "kill": kill}
    result = modes[mode](folder)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
