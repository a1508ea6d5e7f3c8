"""A 2-rank job for the hang-report tests (issue 22), started under torchrun by the tests.

python hang_job.py MODE DIR|env; each rank prints ``RESULT {json}`` when it ends normally.

Modes:
    ok        no hang: rank 1 sends itself SIGUSR1 (a dump; its own handler also runs; the
              job goes on); the handlers are checked after shutdown().
    stuck     rank 1 loops in stuck_in_user_code() while rank 0 waits in all_reduce.
    exit0     rank 1 exits with code 0 before the all_reduce rank 0 waits in.
    mismatch  rank 0 calls barrier while rank 1 calls all_reduce at the same point.
    kill      rank 1 dies of SIGKILL before the all_reduce rank 0 waits in.
    stuck_ignoring_term  as stuck, but rank 1's own SIGTERM handler ignores the signal.
    raise     rank 0 raises ValueError in its own code (uncaught) while rank 1 is stuck.
    with_raise  the same inside ``with devlayer.init(...)``.
    kill0     rank 0 dies of SIGKILL (its store with it) while rank 1 is stuck.
    stop0     rank 0 stops itself (SIGSTOP: its store stays, nothing answers) while rank 1
              is stuck; the watch's poll bound is 3 s instead of 10 (to keep the test short).
    early     rank 0 finishes and shuts down; rank 1 works on (no collective) for
              EARLY_WORK_S seconds, then finishes: a healthy job.
    early_exit  the same, but rank 0 exits without calling shutdown().
    threads   each rank reports devlayer's threads after init() (no hang).
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


def stuck_ignoring_term(folder: str) -> None:
    signal.signal(signal.SIGTERM, lambda signum, frame: print("rank 1 ignores SIGTERM"))
    stuck(folder)


def raise_(folder: str) -> None:
    devlayer.init(backend="cpu", timeout=8, hang_dir=_folder(folder))
    devlayer.all_reduce(torch.ones(4))
    if devlayer.rank() == 1:
        stuck_in_user_code()
    raise ValueError("bad batch on rank 0")


def with_raise(folder: str) -> None:
    with devlayer.init(backend="cpu", timeout=8, hang_dir=_folder(folder)) as st:
        devlayer.all_reduce(torch.ones(4))
        if st.rank == 1:
            stuck_in_user_code()
        raise ValueError("bad batch on rank 0")


def kill0(folder: str) -> None:
    devlayer.init(backend="cpu", timeout=8, hang_dir=_folder(folder))
    devlayer.all_reduce(torch.ones(4))
    if devlayer.rank() == 1:
        stuck_in_user_code()
    os.kill(os.getpid(), signal.SIGKILL)


def stop0(folder: str) -> None:
    from devlayer import peerwatch

    peerwatch.POLL_TIMEOUT_S = 3.0  # the same logic, sooner
    devlayer.init(backend="cpu", timeout=8, hang_dir=_folder(folder))
    devlayer.all_reduce(torch.ones(4))
    if devlayer.rank() == 1:
        stuck_in_user_code()
    print("STOPPING 0", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)


#: Seconds rank 1 works on after rank 0 left: longer than the survivor watch needs to
#: find a gone store and act (two polls, its grace, the hard exit).
EARLY_WORK_S = 25.0


def early(folder: str, shutdown: bool = True) -> dict[str, object] | None:
    devlayer.init(backend="cpu", timeout=8, hang_dir=_folder(folder))
    devlayer.all_reduce(torch.ones(4))
    rank = devlayer.rank()
    if rank == 0:
        if shutdown:
            devlayer.shutdown()
        return {"rank": 0, "finished": True}
    time.sleep(EARLY_WORK_S)  # its own work, no collective: rank 0 and its store are gone
    devlayer.shutdown()
    return {"rank": 1, "finished": True}


def early_exit(folder: str) -> dict[str, object] | None:
    return early(folder, shutdown=False)


def threads(folder: str) -> dict[str, object]:
    import threading

    devlayer.init(backend="cpu", timeout=60, hang_dir=_folder(folder))
    names = sorted(t.name for t in threading.enumerate() if t.name.startswith("devlayer-"))
    devlayer.barrier()
    rank = devlayer.rank()
    devlayer.shutdown()
    left = sorted(t.name for t in threading.enumerate() if t.name.startswith("devlayer-"))
    return {"rank": rank, "threads": names, "after_shutdown": left}


def _folder(folder: str) -> str | None:
    """``env``: no ``hang_dir`` argument (DEVLAYER_HANG_DIR, e.g. from devlayer launch)."""
    return None if folder == "env" else folder


def main() -> None:
    mode, folder = sys.argv[1], sys.argv[2]
    modes = {
        "ok": ok,
        "stuck": stuck,
        "exit0": exit0,
        "mismatch": mismatch,
        "kill": kill,
        "stuck_ignoring_term": stuck_ignoring_term,
        "raise": raise_,
        "kill0": kill0,
        "stop0": stop0,
        "with_raise": with_raise,
        "early": early,
        "early_exit": early_exit,
        "threads": threads,
    }
    result = modes[mode](folder)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
