"""A farm job: records what it sees and proves no other job shares its slot meanwhile."""

import json
import os
import sys
import time
from pathlib import Path

out = Path(sys.argv[1])
index = sys.argv[2]
slot = os.environ["DEVLAYER_FARM_SLOT"]
busy = out / f"busy-{slot.replace(':', '_').replace('#', '_')}"
fd = os.open(busy, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # fails if the slot is shared
try:
    time.sleep(0.3)
    record = {
        "job": int(index),
        "slot": slot,
        "omp": os.environ.get("OMP_NUM_THREADS"),
        "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "pid": os.getpid(),
    }
    (out / f"job-{index}.json").write_text(json.dumps(record))
finally:
    os.close(fd)
    busy.unlink()
