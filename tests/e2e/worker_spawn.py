"""Started by torchrun in tests/e2e/test_spawn_torchrun.py.

``spawn``: torchrun made this process its only rank; ``devlayer.spawn(fn, 2)`` starts a
two-rank job of its own. ``count``: ``DEVLAYER_DEVICES=2`` under two cpu ranks.
"""

from __future__ import annotations

import json
import os
import sys

import devlayer


def _seen() -> dict[str, object]:
    return {
        "rank": devlayer.rank(),
        "world_size": devlayer.world_size(),
        "agent_store": os.environ.get("TORCHELASTIC_USE_AGENT_STORE"),
        "sum": devlayer.all_reduce(devlayer.rank() + 1),
    }


if __name__ == "__main__":
    if sys.argv[1] == "spawn":
        found = devlayer.spawn(_seen, 2, backend="cpu", timeout=20, join_timeout=120)
        print("RESULT " + json.dumps({"rank": 0, "ranks": found}), flush=True)
    else:
        with devlayer.init(backend="cpu"):
            print("RESULT " + json.dumps(_seen()), flush=True)
