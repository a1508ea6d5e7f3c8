"""Import and start-up cost: ``import devlayer`` and ``devlayer.init()`` vs the peers.

    python benchmarks/startup.py [--repeats 7] [--json PATH]

Each measurement runs in a fresh interpreter (``python -c``) so caches of the measuring
process do not help; the time is taken inside the child with ``time.perf_counter`` around
the statement, after interpreter start-up. Peers that are not installed are skipped. Prints
a markdown table: median [min, max] over the repeats.

Targets (issue "Performance"): ``import devlayer`` <= 50 ms without importing torch;
``import devlayer; devlayer.init()`` at world size 1 <= ``import torch`` + 0.2 s.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys

CASES = {
    "import torch": ("import torch", None),
    "import devlayer": ("import devlayer", None),
    "import devlayer; devlayer.init()": ("import devlayer; devlayer.init()", None),
    "import accelerate": ("import accelerate", "accelerate"),
    "accelerate: PartialState()": (
        "from accelerate import PartialState; PartialState(cpu=True)",
        "accelerate",
    ),
    "import lightning.fabric": ("import lightning.fabric", "lightning"),
    "import ignite.distributed": ("import ignite.distributed", "ignite"),
}

CHILD = (
    "import time, sys; t = time.perf_counter(); {stmt}; "
    "print(time.perf_counter() - t, 'torch' in sys.modules)"
)


def measure(stmt: str) -> tuple[float, bool]:
    """Seconds the statement took in a fresh interpreter, and whether torch got imported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE"))}
    out = subprocess.run(
        [sys.executable, "-c", CHILD.format(stmt=stmt)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=300,
    ).stdout.split()
    return float(out[0]), out[1] == "True"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for name, (stmt, module) in CASES.items():
        if module is not None and importlib.util.find_spec(module) is None:
            rows.append({"case": name, "skipped": f"{module} not installed"})
            continue
        measure(stmt)  # warm the file-system cache once
        runs = [measure(stmt) for _ in range(args.repeats)]
        times = [t for t, _ in runs]
        rows.append(
            {
                "case": name,
                "median_ms": statistics.median(times) * 1000,
                "min_ms": min(times) * 1000,
                "max_ms": max(times) * 1000,
                "imports_torch": any(flag for _, flag in runs),
            }
        )
    print("| case | ms: median [min, max] | imports torch |\n|---|---|---|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['case']} | skipped: {r['skipped']} | |")
        else:
            print(
                f"| {r['case']} | {r['median_ms']:.1f} [{r['min_ms']:.1f}, "
                f"{r['max_ms']:.1f}] | {'yes' if r['imports_torch'] else 'no'} |"
            )
    by = {r["case"]: r for r in rows if "median_ms" in r}
    dl, torch_ms = by["import devlayer"], by["import torch"]["median_ms"]
    init_ms = by["import devlayer; devlayer.init()"]["median_ms"]
    print(
        f"\nimport devlayer: {dl['median_ms']:.1f} ms (target <= 50 ms, torch not imported: "
        f"{'met' if not dl['imports_torch'] else 'MISSED'})"
    )
    print(
        f"devlayer.init() at world 1: {init_ms:.0f} ms vs import torch {torch_ms:.0f} ms + "
        f"200 ms budget: {'met' if init_ms <= torch_ms + 200 else 'MISSED'}"
    )
    if args.json:
        with open(args.json, "w") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
