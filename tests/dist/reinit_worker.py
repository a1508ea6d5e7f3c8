"""One rank of the re-initialisation tests: ``init()``, all_reduce, ``shutdown()``, again.

python reinit_worker.py ROUNDS HOST_DELAY HANG_DIR; the rank prints ``RESULT {json}`` when
every round summed right. Rank 0 (the store's host) sleeps ``HOST_DELAY`` seconds before
each ``shutdown()``, so the other ranks start the next round while its old store is up.
"""

from __future__ import annotations

import json
import sys
import time

import torch

import devlayer


def main(rounds: int, host_delay: float, hang_dir: str) -> None:
    sums = []
    for _ in range(rounds):
        with devlayer.init(backend="cpu", timeout=20, hang_dir=hang_dir) as st:
            t = torch.ones(3)
            devlayer.all_reduce(t)
            sums.append(float(t[0]))
            if st.process.rank == 0:
                time.sleep(host_delay)
            rank, world = st.process.rank, st.process.world_size
    ok = sums == [float(world)] * rounds
    print("RESULT " + json.dumps({"rank": rank, "sums": sums, "ok": ok}), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]), sys.argv[3])
