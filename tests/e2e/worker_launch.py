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

import devlayer  # after the no-init branch, which must not import torch
from tests.helpers import listening_addresses

with devlayer.init(timeout=30):
    report = {
        "RANK": devlayer.rank(),
        "args": sys.argv[1:],
        "omp": os.environ.get("OMP_NUM_THREADS"),
        "listeners": listening_addresses(int(os.environ["MASTER_PORT"])),
    }
    print("RESULT " + json.dumps(report), flush=True)
    devlayer.barrier()
    if "--fail-rank1" in sys.argv and devlayer.rank() == 1:
        sys.exit(3)
