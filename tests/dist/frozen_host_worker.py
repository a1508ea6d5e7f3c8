"""One rank of the frozen-host tests: ``init()``, one all_reduce, then rank 0 sleeps (the
test stops it with SIGSTOP) while rank 1 waits for the go file and then, by MODE, calls
``shutdown()`` or runs an all_reduce that times out (rank 0 cannot answer).

python frozen_host_worker.py GO_FILE HANG_DIR MODE TIMEOUT; rank 1 prints ``RESULT {json}``
once its ``shutdown()`` returned (MODE ``shutdown``) or its all_reduce raised (``collective``).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

import devlayer


def main(go: str, hang_dir: str, mode: str, timeout: float) -> None:
    st = devlayer.init(backend="cpu", timeout=timeout, hang_dir=hang_dir)
    t = torch.ones(2)
    devlayer.all_reduce(t)
    print(f"READY {st.process.rank}", flush=True)
    if st.process.rank == 0:
        time.sleep(600)  # stopped by the test; killed at its end
        return
    while not os.path.exists(go):
        time.sleep(0.05)
    if mode == "collective":
        try:
            devlayer.all_reduce(torch.ones(2))
        except devlayer.CollectiveError as exc:
            error = {"error": type(exc).__name__, "report": "Hang report" in str(exc)}
        print("RESULT " + json.dumps({"rank": 1, **error}), flush=True)
    devlayer.shutdown()
    print("RESULT " + json.dumps({"rank": 1, "sum": float(t[0])}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))
