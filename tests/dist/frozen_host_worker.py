"""One rank of the frozen-host test: ``init()``, one all_reduce, then rank 0 sleeps (the
test stops it with SIGSTOP) while rank 1 waits for the go file and calls ``shutdown()``.

python frozen_host_worker.py GO_FILE HANG_DIR; rank 1 prints ``RESULT {json}`` once its
``shutdown()`` returned.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

import devlayer


def main(go: str, hang_dir: str) -> None:
    st = devlayer.init(backend="cpu", timeout=300, hang_dir=hang_dir)
    t = torch.ones(2)
    devlayer.all_reduce(t)
    print(f"READY {st.process.rank}", flush=True)
    if st.process.rank == 0:
        time.sleep(600)  # stopped by the test; killed at its end
        return
    while not os.path.exists(go):
        time.sleep(0.05)
    devlayer.shutdown()
    print("RESULT " + json.dumps({"rank": 1, "sum": float(t[0])}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
