"""A script for `devlayer launch` tests: reports what a rank sees, optionally fails."""

import json
import os
import sys

if "--no-init" in sys.argv:  # simulated devices: only report the environment
    keys = (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "CUDA_VISIBLE_DEVICES",
        "OMP_NUM_THREADS",
        "DEVLAYER_VISIBILITY_APPLIED",
    )
    print("RESULT " + json.dumps({k: os.environ.get(k) for k in keys}), flush=True)
    sys.exit(0)

import devlayer


def listeners(port: int) -> list[str]:
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if os.path.exists(table):
            with open(table) as fh:
                for line in fh.read().splitlines()[1:]:
                    parts = line.split()
                    if parts[3] == "0A" and parts[1].endswith(f":{port:04X}"):
                        found.append(parts[1].split(":")[0])
    return found


with devlayer.init(timeout=30):
    report = {
        "RANK": devlayer.rank(),
        "args": sys.argv[1:],
        "omp": os.environ.get("OMP_NUM_THREADS"),
        "listeners": listeners(int(os.environ["MASTER_PORT"])),
    }
    print("RESULT " + json.dumps(report), flush=True)
    devlayer.barrier()
    if "--fail-rank1" in sys.argv and devlayer.rank() == 1:
        sys.exit(3)
