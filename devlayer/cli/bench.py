"""``devlayer bench``: a collective size sweep, printed like nccl-tests.

Run it under any launcher (``torchrun``, ``srun``, ``mpirun``), or let it start its own
ranks with ``devlayer bench --nproc 2``. For each size it reports the median time per call,
the algorithm bandwidth (bytes / time) and the bus bandwidth, which normalizes for the
world size as nccl-tests does: all_reduce x 2(n-1)/n, all_gather x (n-1)/n, broadcast x 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import devlayer
from devlayer.errors import InvalidArgumentError

__all__ = ["add_arguments", "bus_factor", "parse_size", "run"]

OPS = ("all_reduce", "all_gather", "broadcast")
_UNITS = {
    "": 1,
    "B": 1,
    "K": 1024,
    "KB": 1024,
    "KIB": 1024,
    "M": 1024**2,
    "MB": 1024**2,
    "MIB": 1024**2,
    "G": 1024**3,
    "GB": 1024**3,
    "GIB": 1024**3,
}


def parse_size(text: str) -> int:
    """``"4"``, ``"1K"``, ``"64MiB"`` -> bytes.

    Example:
        >>> parse_size("64M"), parse_size("4")
        (67108864, 4)
    """
    raw = text.strip().upper()
    digits = raw.rstrip("KMGIB")
    unit = raw[len(digits) :]
    if not digits.isdigit() or unit not in _UNITS:
        raise InvalidArgumentError(f"size {text!r} is not a size; use e.g. 4, 1K, 1M, 64MiB")
    return int(digits) * _UNITS[unit]


def bus_factor(op: str, world: int) -> float:
    """nccl-tests' bus-bandwidth factor for ``op`` on ``world`` ranks."""
    if world <= 1:
        return 1.0
    return {"all_reduce": 2 * (world - 1) / world, "all_gather": (world - 1) / world}.get(op, 1.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``devlayer bench`` options."""
    parser.add_argument("--op", choices=OPS, default="all_reduce", help="collective to time")
    parser.add_argument(
        "--sizes",
        default=None,
        help="comma-separated sizes (4,1K,1M,64M); default 4 B .. 64 MiB x4",
    )
    parser.add_argument("--iters", type=int, default=20, help="timed calls per size")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls per size")
    parser.add_argument("--json", action="store_true", help="one JSON document on rank 0")
    parser.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="start this many local ranks (devlayer launch) when not launched",
    )


def _sizes(spec: str | None) -> list[int]:
    if spec:
        return [parse_size(s) for s in spec.split(",") if s.strip()]
    return [4 * 4**i for i in range(13)]  # 4 B .. 64 MiB


def _sync() -> None:
    import torch

    accel = getattr(torch, "accelerator", None)
    if accel is not None and devlayer.device().type != "cpu":
        accel.synchronize()


def _time_op(op: str, nbytes: int, iters: int, warmup: int) -> list[float]:
    import torch

    n = max(nbytes // 4, 1)
    t = torch.ones(n, dtype=torch.float32, device=devlayer.device())
    call = {
        "all_reduce": lambda: devlayer.all_reduce(t),
        "all_gather": lambda: devlayer.all_gather(t, same_shape=True),
        "broadcast": lambda: devlayer.broadcast(t, src=0),
    }[op]
    for _ in range(warmup):
        call()
    _sync()
    times = []
    for _ in range(iters):
        devlayer.barrier()
        start = time.perf_counter()
        call()
        _sync()
        times.append(time.perf_counter() - start)
    # The slowest rank decides how long a collective took.
    return [
        float(v)
        for v in devlayer.all_reduce(torch.tensor(times, dtype=torch.float64), op="max").tolist()
    ]


def run(args: argparse.Namespace) -> int:
    """Run the sweep on this rank; rank 0 prints the table (or JSON)."""
    from devlayer.launchers import detect

    if args.nproc and detect(os.environ).launcher == "none":
        # Not launched yet: start the ranks with devlayer launch, passing the same options.
        from devlayer.cli import launch

        again = ["--op", args.op, "--iters", str(args.iters), "--warmup", str(args.warmup)]
        again += ["--sizes", args.sizes] if args.sizes else []
        again += ["--json"] if args.json else []
        parser = argparse.ArgumentParser()
        launch.add_arguments(parser)
        return launch.run(
            parser.parse_args(["--nproc", str(args.nproc), "-m", "devlayer", "bench", *again])
        )
    if args.iters < 1 or args.warmup < 0:
        raise InvalidArgumentError("--iters must be >= 1 and --warmup >= 0")
    with devlayer.init() as st:
        rows: list[dict[str, Any]] = []
        for nbytes in _sizes(args.sizes):
            times = _time_op(args.op, nbytes, args.iters, args.warmup)
            med = statistics.median(times)
            algbw = nbytes / med / 1e9 if med > 0 else 0.0
            rows.append(
                {
                    "op": args.op,
                    "bytes": max(nbytes // 4, 1) * 4,
                    "time_us": med * 1e6,
                    "min_us": min(times) * 1e6,
                    "algbw_GBps": algbw,
                    "busbw_GBps": algbw * bus_factor(args.op, st.world_size),
                }
            )
        if not st.is_main:
            return 0
        meta = {
            "backend": st.backend,
            "comm": st.comm,
            "world_size": st.world_size,
            "device": str(st.device),
            "devlayer": devlayer.__version__,
        }
        if args.json:
            print(json.dumps({"schema": 1, **meta, "results": rows}), flush=True)
            return 0
        print(
            f"# devlayer bench {args.op}: backend {st.backend}, comm {st.comm}, "
            f"{st.world_size} rank(s), device {st.device}"
        )
        print(
            f"{'size (B)':>12} {'time (us)':>11} {'min (us)':>10} {'algbw (GB/s)':>13} "
            f"{'busbw (GB/s)':>13}"
        )
        for r in rows:
            print(
                f"{r['bytes']:>12} {r['time_us']:>11.1f} {r['min_us']:>10.1f} "
                f"{r['algbw_GBps']:>13.3f} {r['busbw_GBps']:>13.3f}"
            )
    return 0
