"""Crash rank 1 in the first N torchrun attempts; the next attempt must rendezvous cleanly.

torchrun hands a restarted attempt the same agent store; devlayer keeps each attempt's keys
apart (TORCHELASTIC_RESTART_COUNT), so gloo never dials the dead attempt's addresses.
"""

import os
import sys

import torch

import devlayer

attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
fail_until = int(sys.argv[1])
with devlayer.init(backend="cpu", timeout=20):
    t = devlayer.all_reduce(torch.ones(1))
    assert t.item() == devlayer.world_size()
    if attempt < fail_until and devlayer.rank() == 1:
        os._exit(3)
    devlayer.barrier(timeout=20)
    if devlayer.is_main():
        print(f"OK attempt={attempt}", flush=True)
