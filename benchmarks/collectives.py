"""Wrapper overhead of devlayer's collectives against raw ``torch.distributed``.

Run (CPU/gloo here; unchanged on GPUs, where ``devlayer.device()`` is the accelerator)::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node=2 benchmarks/collectives.py
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node=2 -m benchmarks.collectives --quick
    ... --json benchmarks/results/collectives.jsonl   # raw records, one JSON object per line
    ... --sections metric_dict                        # only some sections (comma-separated)

Sections (all by default; ``--sections`` picks some, always run in this order):

1. ``all_reduce``: one float32 tensor, 4 B .. 64 MiB: ``devlayer.all_reduce(t)`` vs
   ``dist.all_reduce(t)``; the same call with the argument check that ``DEVLAYER_DEBUG=1``
   runs on every call (what checking every call costs), and without the check that runs
   by default on the first 64 collectives and every 128th after (what that sampled check
   costs: devlayer / unchecked - 1). ``all_gather``
   (``same_shape=True`` and the default, uneven-capable form) vs
   ``dist.all_gather_single``/``all_gather_into_tensor`` (section ``all_gather``), and
   ``broadcast`` vs ``dist.broadcast`` (section ``broadcast``), for a few sizes.
2. ``metric_dict``: the mean of a dict of 64 scalar tensors: ``devlayer.all_reduce(d,
   op="mean")`` vs a per-key ``dist.all_reduce`` + divide loop vs a hand-flattened
   ``torch.stack`` + one ``all_reduce`` + divide, and the libraries users would pick
   instead, each only when it is installed (``pip install -e '.[dev,bench]'``; otherwise its
   row says "skipped: not installed"): HF Accelerate's ``accelerate.utils.reduce(d,
   reduction="mean")``, Lightning Fabric's ``fabric.all_reduce(d, reduce_op="mean")`` and
   PyTorch-Ignite's ``idist.all_reduce`` per key (it takes no dicts) + divide. Each library
   adopts the process group this script created (none starts its own or spawns), and each
   result is checked against devlayer's mean, on every rank, before anything is timed.
3. ``numbers``: ``devlayer.all_reduce`` of Python numbers (a float, an int, a dict of both,
   an int past ``2**53``) vs the numbers put in one tensor by hand, one
   ``dist.all_reduce`` and ``.tolist()``; with how many collectives devlayer's call makes.

Method: every implementation gets warm-up calls, then a calibrated number of calls per
timed block (about ``--block-s`` seconds, at least one call; the same count on every rank,
and for the wrapper-vs-raw pairs the same count for both). A block starts after a barrier
(and a device synchronize on accelerators), ends after a synchronize, and is timed with
``time.perf_counter`` on every rank; the slowest rank's time is kept. One repeat is
``--rounds`` rounds, each running every implementation once, in A B C order on even rounds
and C B A on odd ones, so drift and bursts of load from other processes fall on every
implementation alike. Tables give, per implementation, the median [min, max] over repeats;
for ratios (overhead = devlayer / raw - 1, speedups) also the median of the per-round
ratios with a distribution-free 95 % confidence interval. A target is reported as met or
MISSED only when that interval lies on one side of it, otherwise as unresolved.

This is a benchmark that prints tables, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, cast

import torch
import torch.distributed as dist

import devlayer
from devlayer import collective_checks, comm, ledger

if __package__ in (None, ""):  # run as a file (torchrun benchmarks/collectives.py)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import git_state, med_range, table

KiB = 1024
MiB = 1024 * KiB

# Targets printed next to the results (see docs/performance.md).
TARGET_OVERHEAD_LARGE = 0.05  # at >= 1 MiB
TARGET_OVERHEAD_SMALL = 0.15  # at 4 B
TARGET_LEDGER_SMALL = 0.02  # the collective ledger's own cost at 4 B (issue 22)
TARGET_LEDGER_LARGE = 0.005  # ... and at >= 1 MiB
TARGET_DICT_SPEEDUP = 20.0  # coalesced vs per-key loop
TARGET_DICT_VS_FLAT = 1.10  # coalesced / hand-flattened

N_METRICS = 64

Impl = tuple[str, Callable[[], object]]


@dataclass
class Timings:
    """µs per call for each implementation: one value per repeat, and one per round."""

    repeats: dict[str, list[float]]
    rounds: dict[str, list[float]]


# --------------------------------------------------------------------------- timing


class Bench:
    """Times interleaved implementations across ranks and keeps the records.

    One *repeat* is ``rounds`` rounds; a round runs every implementation once as a short
    timed block (barrier, synchronize, ``iters`` calls, synchronize), in A B C order on even
    rounds and C B A on odd ones, so slow drift and bursts of load from other processes fall
    on every implementation alike. A repeat's time for an implementation is the sum of its
    blocks (each block: the slowest rank) divided by its calls.
    """

    def __init__(
        self, *, repeats: int, rounds: int, block_s: float, warmup: int, max_iters: int
    ) -> None:
        self.repeats = repeats
        self.rounds = rounds
        self.block_s = block_s
        self.warmup = warmup
        self.max_iters = max_iters
        self.device = devlayer.device()
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.records: list[dict[str, Any]] = []
        # torch.accelerator exists on torch >= 2.6; CPU needs no synchronize.
        self._sync_fn = (
            torch.accelerator.synchronize
            if self.device.type != "cpu" and hasattr(torch, "accelerator")
            else None
        )

    def sync(self) -> None:
        if self._sync_fn is not None:
            self._sync_fn()

    def _max_over_ranks(self, values: list[float]) -> list[float]:
        """Element-wise max over ranks, done outside any timed region."""
        buf = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(buf, op=dist.ReduceOp.MAX)
        return buf.tolist()

    def _block(self, fn: Callable[[], object], iters: int) -> float:
        dist.barrier()
        self.sync()
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        self.sync()
        return time.perf_counter() - start

    def _per_call(self, fn: Callable[[], object]) -> float:
        """Seconds per call (slowest rank), from a block of at least half ``block_s``."""
        n = 1
        while True:
            elapsed = self._max_over_ranks([self._block(fn, n)])[0]
            if elapsed >= self.block_s / 2 or n >= self.max_iters:
                return elapsed / n
            n *= 2

    def _calibrate(self, impls: list[Impl], common: bool) -> list[int]:
        """Warm up, then pick calls per block (the same on every rank).

        With ``common``, every implementation gets the same count (they do the same work,
        so a separate noisy estimate per implementation would only add noise).
        """
        for _, fn in impls:
            for _ in range(self.warmup):
                fn()
        per_call = [self._per_call(fn) for _, fn in impls]
        if common:
            per_call = [max(per_call)] * len(per_call)
        return [max(1, min(self.max_iters, round(self.block_s / s))) for s in per_call]

    def run(
        self, section: str, case: dict[str, Any], impls: list[Impl], *, common_iters: bool = True
    ) -> Timings:
        """Time ``impls`` interleaved; return µs per call per impl, per repeat and per round."""
        names = [name for name, _ in impls]
        iters = dict(zip(names, self._calibrate(impls, common_iters), strict=True))
        out = Timings({name: [] for name in names}, {name: [] for name in names})
        for rep in range(self.repeats):
            local: dict[str, list[float]] = {name: [] for name in names}
            for rnd in range(self.rounds):
                for name, fn in impls if rnd % 2 == 0 else impls[::-1]:
                    local[name].append(self._block(fn, iters[name]))
            flat = [t for name in names for t in local[name]]
            slowest = iter(self._max_over_ranks(flat))
            for name in names:
                blocks = [next(slowest) for _ in range(self.rounds)]
                n = iters[name]
                us = sum(blocks) / (n * self.rounds) * 1e6
                out.repeats[name].append(us)
                out.rounds[name].extend(t / n * 1e6 for t in blocks)
                self.records.append(
                    {
                        "type": "result",
                        "section": section,
                        **case,
                        "impl": name,
                        "repeat": rep,
                        "rounds": self.rounds,
                        "iters_per_block": n,
                        "us_per_call": us,
                        "block_s_slowest_rank": blocks,
                        "block_s_rank0": local[name],
                    }
                )
        return out


# --------------------------------------------------------------------------- statistics


def paired(a: list[float], b: list[float]) -> list[float]:
    """Ratios a/b of measurements taken next to each other (same repeat or same round)."""
    return [x / y for x, y in zip(a, b, strict=True)]


def median_ci(values: list[float], conf: float = 0.95) -> tuple[float, float, float]:
    """Median and a distribution-free confidence interval for it.

    The interval is ``[x_(k), x_(n-k+1)]`` of the sorted values, with the largest ``k``
    for which ``P(Binomial(n, 1/2) <= k - 1) <= (1 - conf) / 2``; it assumes nothing about
    the shape of the noise. With too few values it is the full range.
    """
    xs = sorted(values)
    n = len(xs)
    alpha = (1.0 - conf) / 2
    k, cum = 0, 0.0
    for i in range(n):
        cum += math.comb(n, i) / 2**n
        if cum > alpha:
            break
        k = i + 1
    if k == 0:
        return statistics.median(xs), xs[0], xs[-1]
    return statistics.median(xs), xs[k - 1], xs[n - k]


def pct(r: float) -> str:
    return f"{(r - 1.0) * 100:+.1f}"


def overhead_repeats(ratios: list[float]) -> str:
    """Per-repeat ratios as an overhead: ``median % [min, max]``."""
    return f"{pct(statistics.median(ratios))} % [{pct(min(ratios))}, {pct(max(ratios))}]"


def overhead_ci(ratios: list[float]) -> str:
    """Per-round ratios as an overhead: ``median % (CI lo, hi)``."""
    med, lo, hi = median_ci(ratios)
    return f"{pct(med)} % ({pct(lo)}, {pct(hi)})"


def verdict_at_most(lo: float, hi: float, limit: float) -> str:
    """Judge an upper limit against a confidence interval, not against one noisy number."""
    if hi <= limit:
        return "met"
    if lo > limit:
        return "MISSED"
    return "unresolved (CI spans it)"


def verdict_at_least(lo: float, hi: float, limit: float) -> str:
    if lo >= limit:
        return "met"
    if hi < limit:
        return "MISSED"
    return "unresolved (CI spans it)"


def fmt_bytes(n: int) -> str:
    if n >= MiB:
        return f"{n // MiB} MiB"
    if n >= KiB:
        return f"{n // KiB} KiB"
    return f"{n} B"


# --------------------------------------------------------------------------- sections

OVERHEAD_HEAD = ["overhead: median [min, max] of repeats", "overhead: median (95 % CI) of rounds"]


def checked_all_reduce(t: torch.Tensor) -> object:
    """``devlayer.all_reduce(t)`` preceded by DEVLAYER_DEBUG's argument check.

    The cheapest check that cannot itself crash gloo (which aborts on buffers of different
    sizes): one all_reduce of a fixed two-int64 digest before the data. This row is what an
    always-on check would cost; devlayer runs it only with ``DEVLAYER_DEBUG=1``.
    """
    ctx = comm._ctx()
    comm._check_signatures(ctx, 0, "all_reduce", "sum", collective_checks.tensor_text(t))
    return devlayer.all_reduce(t)


def _never_checked(seq: int, *, debug: bool) -> bool:
    return False


def unchecked_all_reduce(t: torch.Tensor) -> object:
    """``devlayer.all_reduce(t)`` with the sampled argument check switched off (on every
    rank alike): the default row minus this one is what the sampled check costs."""
    saved = comm.is_checked
    comm.is_checked = _never_checked
    try:
        return devlayer.all_reduce(t)
    finally:
        comm.is_checked = saved


class _NullLedger(ledger.Ledger):
    """A ledger that records nothing: the 'ledger off' row (issue 22)."""

    _REC: ClassVar[list[Any]] = [0, "", None, None, 0, 0.0, 0.0, ledger.DONE]

    def begin(self, op: str, detail: object = None, depth: int = 1) -> list[Any]:
        return self._REC

    @staticmethod
    def done(rec: list[Any]) -> None:
        return None

    @staticmethod
    def fail(rec: list[Any]) -> None:
        return None


_NULL_LEDGER = _NullLedger(size=1)


def ledger_all_reduce(on: bool, t: torch.Tensor) -> object:
    """``devlayer.all_reduce(t)`` with the collective ledger on or off (issue 22).

    Both rows swap the ledger in for the call (the real one, or one that records nothing),
    so the swap's own cost falls on both and their ratio is what the ledger costs: the
    record's begin (call-site frame walk, a list, a deque append, a clock read) and its end
    (one store, which ``comm`` inlines: it lands in the null ledger's shared record).
    """
    ctx = comm._ctx()
    real = ctx.ledger
    object.__setattr__(ctx, "ledger", real if on else _NULL_LEDGER)
    try:
        return devlayer.all_reduce(t)
    finally:
        object.__setattr__(ctx, "ledger", real)


def ledger_alone_us(t: torch.Tensor, calls: int = 20000, repeats: int = 5) -> float:
    """µs per call of what the ledger adds to an all_reduce, timed alone (best of
    ``repeats``): a record begun with the tensor's shape and dtype and marked done. Load
    from other processes inflates it less than it blurs the paired ratio."""
    led = ledger.Ledger()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            ledger.Ledger.done(led.begin("all_reduce", (t.shape, t.dtype)))
        best = min(best, time.perf_counter() - start)
    return best / calls * 1e6


def _ledger_target(nbytes: int) -> float | None:
    if nbytes >= MiB:
        return TARGET_LEDGER_LARGE
    if nbytes <= 4:
        return TARGET_LEDGER_SMALL
    return None


def _ledger_cells(tm: Timings, nbytes: int, alone_us: float) -> list[str]:
    """The ledger's cost (on vs off, paired by round), its verdict against the target, and
    its cost timed alone as a share of the raw call."""
    ratios = paired(tm.rounds["ledger_on"], tm.rounds["ledger_off"])
    share = alone_us / statistics.median(tm.repeats["raw"])
    alone = f"{alone_us:.2f} µs = {share * 100:.2f} % of raw"
    target = _ledger_target(nbytes)
    if target is None:
        return [overhead_ci(ratios), "n/a", alone]
    _, lo, hi = median_ci(ratios)
    judged = f"<= {target * 100:g} %: {verdict_at_most(lo - 1, hi - 1, target)}"
    return [overhead_ci(ratios), judged, alone]


def bench_all_reduce(b: Bench, sizes: list[int]) -> str:
    rows = []
    for nbytes in sizes:
        # Zeros: a repeated in-place SUM stays 0, so no inf/NaN/denormal slows later calls.
        t = torch.zeros(nbytes // 4, dtype=torch.float32, device=b.device)
        impls: list[Impl] = [
            ("raw", partial(dist.all_reduce, t)),
            ("devlayer", partial(devlayer.all_reduce, t)),
            ("devlayer_checked", partial(checked_all_reduce, t)),
            ("devlayer_unchecked", partial(unchecked_all_reduce, t)),
            ("ledger_on", partial(ledger_all_reduce, True, t)),
            ("ledger_off", partial(ledger_all_reduce, False, t)),
        ]
        tm = b.run("all_reduce", {"bytes": nbytes, "dtype": "float32"}, impls)
        per_round = paired(tm.rounds["devlayer"], tm.rounds["raw"])
        target = _overhead_target(nbytes)
        if target is None:
            judged = "n/a"
        else:
            _, lo, hi = median_ci(per_round)
            judged = f"<= {target * 100:.0f} %: {verdict_at_most(lo - 1, hi - 1, target)}"
        rows.append(
            [
                fmt_bytes(nbytes),
                med_range(tm.repeats["raw"]),
                med_range(tm.repeats["devlayer"]),
                overhead_repeats(paired(tm.repeats["devlayer"], tm.repeats["raw"])),
                overhead_ci(per_round),
                judged,
                med_range(tm.repeats["devlayer_checked"]),
                overhead_ci(paired(tm.rounds["devlayer_checked"], tm.rounds["raw"])),
                med_range(tm.repeats["devlayer_unchecked"]),
                overhead_ci(paired(tm.rounds["devlayer"], tm.rounds["devlayer_unchecked"])),
                *_ledger_cells(tm, nbytes, ledger_alone_us(t)),
            ]
        )
    head = [
        "size",
        "raw µs/call",
        "devlayer µs/call",
        *OVERHEAD_HEAD,
        "target",
        "checking every call (DEVLAYER_DEBUG=1) µs/call",
        "its overhead vs raw (95 % CI)",
        "no check at all µs/call",
        "the sampled check's cost: devlayer vs no check (95 % CI)",
        "the ledger's cost: on vs off (95 % CI)",
        "ledger target",
        "the ledger timed alone (share of raw)",
    ]
    note = (
        "'Checking every call' times the argument check DEVLAYER_DEBUG=1 runs before each "
        "call (one all_reduce of a two-int64 digest before the data). The default (the "
        "devlayer column) checks the first 64 collectives and then every 128th; 'no check "
        "at all' switches that off, so that column is what the sampled check costs. The "
        "ledger's cost pairs the default call with the collective ledger (issue 22) on and "
        "off, each swapped in for the call."
    )
    return f"### all_reduce (float32, op=sum)\n\n{note}\n\n" + table(head, rows)


def _overhead_target(nbytes: int) -> float | None:
    if nbytes >= MiB:
        return TARGET_OVERHEAD_LARGE
    if nbytes <= 4:
        return TARGET_OVERHEAD_SMALL
    return None


def bench_all_gather(b: Bench, sizes: list[int]) -> str:
    # torch 2.13 renamed all_gather_into_tensor to all_gather_single; older torch has the old name.
    gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    rows = []
    for nbytes in sizes:
        t = torch.ones(nbytes // 4, dtype=torch.float32, device=b.device)
        n_out = t.numel() * b.world

        def raw(t: torch.Tensor = t, n_out: int = n_out) -> object:
            # Allocates its output per call, as devlayer has to.
            out = torch.empty(n_out, dtype=t.dtype, device=t.device)
            gather_into(out, t)
            return out

        impls: list[Impl] = [
            ("raw", raw),
            ("devlayer_same_shape", partial(devlayer.all_gather, t, same_shape=True)),
            ("devlayer_default", partial(devlayer.all_gather, t)),
        ]
        tm = b.run("all_gather", {"bytes": nbytes, "dtype": "float32"}, impls)
        rows.append(
            [
                fmt_bytes(nbytes),
                med_range(tm.repeats["raw"]),
                med_range(tm.repeats["devlayer_same_shape"]),
                overhead_ci(paired(tm.rounds["devlayer_same_shape"], tm.rounds["raw"])),
                med_range(tm.repeats["devlayer_default"]),
                overhead_ci(paired(tm.rounds["devlayer_default"], tm.rounds["raw"])),
            ]
        )
    head = [
        "size per rank",
        "raw µs/call",
        "same_shape=True µs/call",
        "overhead (95 % CI)",
        "default (uneven-capable) µs/call",
        "overhead (95 % CI)",
    ]
    title = f"### all_gather (float32; raw = dist.{gather_into.__name__} into a fresh tensor)"
    return f"{title}\n\n" + table(head, rows)


def bench_broadcast(b: Bench, sizes: list[int]) -> str:
    rows = []
    for nbytes in sizes:
        t = torch.ones(nbytes // 4, dtype=torch.float32, device=b.device)
        impls: list[Impl] = [
            ("raw", partial(dist.broadcast, t, src=0)),
            ("devlayer", partial(devlayer.broadcast, t, src=0)),
        ]
        tm = b.run("broadcast", {"bytes": nbytes, "dtype": "float32"}, impls)
        rows.append(
            [
                fmt_bytes(nbytes),
                med_range(tm.repeats["raw"]),
                med_range(tm.repeats["devlayer"]),
                overhead_repeats(paired(tm.repeats["devlayer"], tm.repeats["raw"])),
                overhead_ci(paired(tm.rounds["devlayer"], tm.rounds["raw"])),
            ]
        )
    head = ["size", "raw µs/call", "devlayer µs/call", *OVERHEAD_HEAD]
    return "### broadcast (float32, src=0)\n\n" + table(head, rows)


# Python numbers as users pass them every step: all_reduce(loss.item()), a dict of them.
NUMBER_CASES: tuple[tuple[str, object], ...] = (
    ("1.5 (a float)", 1.5),
    ("3 (an int)", 3),
    ('{"loss": 0.5, "n": 3}', {"loss": 0.5, "n": 3}),
    ("2**53 + 1 (an int float64 cannot hold: the exact path)", 2**53 + 1),
)


def raw_numbers(device: torch.device, value: object) -> object:
    """The hand-written way: the numbers in one tensor (int64 if all are ints, else
    float64), one ``dist.all_reduce``, back to Python numbers."""
    keys = list(value) if isinstance(value, dict) else None
    values = list(value.values()) if isinstance(value, dict) else [value]
    dtype = torch.int64 if all(type(v) is int for v in values) else torch.float64
    buf = torch.tensor(values, dtype=dtype, device=device)
    dist.all_reduce(buf)
    out = buf.tolist()
    return dict(zip(keys, out, strict=True)) if keys is not None else out[0]


def collectives_per_call(fn: Callable[[], object]) -> int:
    """How many ``dist.all_reduce`` calls ``fn`` makes, the sampled check switched off."""
    calls = [0]
    real, saved = dist.all_reduce, comm.is_checked

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    dist.all_reduce, comm.is_checked = counting, _never_checked
    try:
        fn()
    finally:
        dist.all_reduce, comm.is_checked = real, saved
    return calls[0]


def bench_numbers(b: Bench) -> str:
    rows = []
    for label, value in NUMBER_CASES:
        impls: list[Impl] = [
            ("raw", partial(raw_numbers, b.device, value)),
            ("devlayer", partial(devlayer.all_reduce, value)),
        ]
        n_calls = collectives_per_call(impls[1][1])
        tm = b.run("numbers", {"value": label, "collectives": n_calls}, impls)
        rows.append(
            [
                label,
                str(n_calls),
                med_range(tm.repeats["raw"]),
                med_range(tm.repeats["devlayer"]),
                overhead_repeats(paired(tm.repeats["devlayer"], tm.repeats["raw"])),
                overhead_ci(paired(tm.rounds["devlayer"], tm.rounds["raw"])),
            ]
        )
    head = [
        "value (the same on every rank)",
        "devlayer collectives/call",
        "raw µs/call",
        "devlayer µs/call",
        *OVERHEAD_HEAD,
    ]
    note = (
        "raw: the numbers in one int64 (all ints) or float64 tensor, one dist.all_reduce, "
        ".tolist(). devlayer.all_reduce(value) sends them with their type flags in one "
        "float64 collective, and adds the exact int64 path only where an int result could "
        "be inexact in float64 (docs/reliability.md, R5-C8)."
    )
    return f"### all_reduce of Python numbers (op=sum)\n\n{note}\n\n" + table(head, rows)


# --------------------------------------------------------------------------- peers
#
# The libraries users would pick instead of devlayer for a metric dict's mean. All are
# optional extras, imported only here. Each must adopt the process group this script
# created with devlayer.init(): none may start a group of its own, or processes.

# A dict's mean; what it returns is checked against devlayer's before it is timed.
Mean = Callable[[dict[str, torch.Tensor]], object]


class PeerSkipped(Exception):
    """A peer library cannot be benchmarked here; the message says why."""


@dataclass
class Peer:
    """One peer library's mean of a dict, or why it is not timed."""

    impl: str  # the "impl" of its JSONL records
    label: str  # its table row
    setup: Callable[[Bench], Mean]
    mean: Mean | None = None
    skipped: str | None = None


def _accelerate_mean(b: Bench) -> Mean:
    try:
        from accelerate import PartialState
        from accelerate.utils import DistributedType
        from accelerate.utils import reduce as accelerate_reduce
    except ImportError as e:
        raise PeerSkipped("not installed") from e
    # PartialState calls init_process_group only while torch.distributed is not initialized,
    # so here it adopts the existing group. reduce() asks PartialState() for every leaf, so
    # the state must exist first. On the CPU it needs cpu=True: without it PartialState finds
    # no accelerator, reports DistributedType.NO, and reduce() returns its input unreduced.
    threads = torch.get_num_threads()
    state = PartialState(cpu=b.device.type == "cpu")
    # With OMP_NUM_THREADS unset PartialState also changes torch's thread count; keep ours
    # so that the sections after this one run as they would without Accelerate.
    torch.set_num_threads(threads)
    if state.distributed_type == DistributedType.NO or state.num_processes != b.world:
        raise PeerSkipped(
            f"PartialState sees {state.distributed_type} with {state.num_processes} "
            f"process(es), not the {b.world} of the existing group"
        )
    return partial(accelerate_reduce, reduction="mean")


def _fabric_mean(b: Bench) -> Mean:
    # "lightning" ships it as lightning.fabric; the standalone distribution as lightning_fabric.
    for module in ("lightning.fabric", "lightning_fabric"):
        try:
            Fabric = importlib.import_module(module).Fabric
            break
        except ImportError:
            continue
    else:
        raise PeerSkipped("not installed")
    st = devlayer.state()
    # The accelerator follows the device devlayer picked ("cpu", "cuda", "mps", ...); a
    # device type Fabric has no accelerator for makes it raise, which skips it.
    fabric = Fabric(
        accelerator=b.device.type,
        devices=st.local_world_size,
        num_nodes=st.process.num_nodes,
        strategy="ddp",
    )
    # Under torchrun (or SLURM) Fabric's cluster environment says the processes are created
    # externally, so launch() spawns nothing, and its _init_dist_connection() returns early
    # because torch.distributed is already initialized. Under a launcher Fabric does not
    # know it would start processes itself: skip rather than let it.
    env = getattr(fabric.strategy, "cluster_environment", None)
    if env is None or not env.creates_processes_externally:
        raise PeerSkipped(
            f"Fabric's cluster environment ({type(env).__name__}) would start processes"
        )
    if fabric.device != b.device:
        raise PeerSkipped(f"Fabric would use {fabric.device}, devlayer uses {b.device}")
    group = dist.group.WORLD
    fabric.launch()
    if dist.group.WORLD is not group or (fabric.global_rank, fabric.world_size) != (
        b.rank,
        b.world,
    ):
        raise PeerSkipped(
            f"after launch() Fabric is rank {fabric.global_rank} of {fabric.world_size} "
            f"(same default group: {dist.group.WORLD is group}); expected {b.rank} of {b.world}"
        )
    return partial(fabric.all_reduce, reduce_op="mean")


def _ignite_mean(b: Bench) -> Mean:
    try:
        import ignite.distributed as idist
    except ImportError as e:
        raise PeerSkipped("not installed") from e
    # idist.sync() adopts the default group: the native model's create_from_context() wraps
    # it when torch.distributed is initialized (idist.initialize() would refuse, as a default
    # group exists). Its set-up makes and destroys one gloo subgroup to count the ranks per
    # node; that is a collective, so every rank must get here.
    idist.sync()
    seen = (idist.model_name(), idist.get_rank(), idist.get_world_size())
    if seen != ("native-dist", b.rank, b.world):
        raise PeerSkipped(f"idist sees (model, rank, world size) = {seen}")
    # Ignite's native model places collectives on its own idea of the device and copies
    # other tensors there and back; only time it where that is devlayer's device.
    if idist.device().type != b.device.type:
        raise PeerSkipped(f"idist.device() is {idist.device()}, devlayer uses {b.device}")
    world = b.world

    def per_key(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # idist.all_reduce takes one tensor or number; a dict raises TypeError (0.5.5).
        out = {}
        for k, v in d.items():
            out[k] = cast(torch.Tensor, idist.all_reduce(v, op="SUM")).div_(world)
        return out

    return per_key


PEERS = [
    (
        "accelerate_reduce",
        'HF Accelerate: accelerate.utils.reduce(dict, reduction="mean") '
        "(per key: clone, all_reduce, /=)",
        _accelerate_mean,
    ),
    (
        "fabric_all_reduce",
        'Lightning Fabric: fabric.all_reduce(dict, reduce_op="mean") '
        "(per key: barrier, all_reduce, div_)",
        _fabric_mean,
    ),
    (
        "ignite_per_key",
        'PyTorch-Ignite: idist.all_reduce(t, op="SUM") + div_ per key (takes no dicts)',
        _ignite_mean,
    ),
]


def _agree(b: Bench, ok: list[bool]) -> list[bool]:
    """True where every rank says True, so that all ranks time the same implementations."""
    if not ok:
        return []
    flags = torch.tensor([float(x) for x in ok], dtype=torch.float64, device=b.device)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    return [x > 0 for x in flags.tolist()]


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0]


def _mismatch(got: object, expected: dict[str, torch.Tensor]) -> str | None:
    """Why ``got`` is not ``expected`` (devlayer's mean), or None when it is."""
    if not isinstance(got, dict) or list(got) != list(expected):
        return f"returned {type(got).__name__} {list(got) if isinstance(got, dict) else ''}"
    bad = []
    for k, e in expected.items():
        g = got[k]
        if not (
            isinstance(g, torch.Tensor)
            and g.shape == e.shape
            and g.dtype == e.dtype
            and torch.allclose(g.to(e.device), e, rtol=1e-5, atol=1e-6)
        ):
            bad.append(k)
    if not bad:
        return None
    k = bad[0]
    return (
        f"{len(bad)} of {len(expected)} values differ from devlayer's mean "
        f"(e.g. {k}: {got[k]!r} vs {expected[k]!r})"
    )


def setup_peers(b: Bench, metrics: dict[str, torch.Tensor]) -> list[Peer]:
    """Set up each peer, then check its mean of ``metrics`` against devlayer's, untimed.

    ``metrics`` must still hold each rank's own values (nothing reduced yet), so that a
    peer that does not reduce at all fails the check.
    """
    peers = [Peer(impl, label, setup) for impl, label, setup in PEERS]
    for peer in peers:
        try:
            peer.mean = peer.setup(b)
        except PeerSkipped as e:
            peer.skipped = f"skipped: {e}"
        except Exception as e:  # the library's own set-up error: report it, time the rest
            peer.skipped = f"skipped, set-up failed: {type(e).__name__}: {_first_line(e)}"
    for peer, ok in zip(peers, _agree(b, [p.mean is not None for p in peers]), strict=True):
        if not ok and peer.skipped is None:
            peer.mean, peer.skipped = None, "skipped: set-up failed on another rank"
    expected = devlayer.all_reduce({k: v.clone() for k, v in metrics.items()}, op="mean")
    live = [(p, p.mean) for p in peers if p.mean is not None]
    for peer, mean in live:
        try:
            peer.skipped = _mismatch(mean({k: v.clone() for k, v in metrics.items()}), expected)
        except Exception as e:  # also reported, not raised: the other peers still get timed
            peer.skipped = f"raised {type(e).__name__}: {_first_line(e)}"
    for (peer, _), ok in zip(live, _agree(b, [p.skipped is None for p, _ in live]), strict=True):
        if not ok:
            peer.mean = None
            peer.skipped = f"not timed, wrong result: {peer.skipped or 'on another rank'}"
    for peer in peers:
        if peer.skipped is not None:
            b.records.append(
                {
                    "type": "skipped",
                    "section": "metric_dict",
                    "impl": peer.impl,
                    "rank": b.rank,
                    "reason": peer.skipped,
                }
            )
    return peers


# --------------------------------------------------------------------------- metric dict


def bench_metric_dict(b: Bench) -> str:
    world = b.world
    gen = torch.Generator().manual_seed(1234 + b.rank)
    # op="mean" of the same values on every call converges and stays finite.
    metrics = {
        f"metric_{i:02d}": torch.rand((), generator=gen).to(b.device) for i in range(N_METRICS)
    }
    values = list(metrics.values())
    # Before anything reduces ``metrics`` in place: the check needs each rank's own values.
    peers = setup_peers(b, metrics)

    def per_key() -> object:
        for v in values:
            dist.all_reduce(v)
            v.div_(world)
        return metrics

    def flattened() -> object:
        buf = torch.stack(list(metrics.values()))
        dist.all_reduce(buf)
        buf.div_(world)
        return dict(zip(metrics, buf.unbind(), strict=True))

    def flattened_in_place() -> object:
        # Context only: also writes the results back into the caller's tensors, as
        # devlayer.all_reduce promises ("tensors are updated in place").
        buf = torch.stack(values)
        dist.all_reduce(buf)
        buf.div_(world)
        torch._foreach_copy_(values, buf.unbind())
        return metrics

    impls: list[Impl] = [
        ("per_key_loop", per_key),
        ("hand_flattened", flattened),
        ("hand_flattened_in_place", flattened_in_place),
        ("devlayer", partial(devlayer.all_reduce, metrics, op="mean")),
    ]
    impls += [(p.impl, partial(p.mean, metrics)) for p in peers if p.mean is not None]
    tm = b.run(
        "metric_dict", {"n_scalars": N_METRICS, "dtype": "float32"}, impls, common_iters=False
    )
    r, d = tm.repeats, tm.rounds

    def ratio_cells(num: str, den: str, limit: float | None, at_least: bool) -> str:
        med, lo, hi = median_ci(paired(d[num], d[den]))
        text = (
            f"{med_range(paired(r[num], r[den]), '{:.2f}')}x; rounds {med:.2f}x "
            f"(CI {lo:.2f}, {hi:.2f})"
        )
        if limit is None:
            return text
        judge = verdict_at_least if at_least else verdict_at_most
        return f"{text}; target {'>=' if at_least else '<='} {limit:g}x: {judge(lo, hi, limit)}"

    def vs_devlayer(name: str) -> str:
        return ratio_cells(name, "devlayer", None, at_least=False)

    rows = [
        [
            "per-key loop (64 x dist.all_reduce + div_)",
            med_range(r["per_key_loop"]),
            "",
            "",
            vs_devlayer("per_key_loop"),
        ],
        [
            "hand-flattened (stack, 1 all_reduce, div_)",
            med_range(r["hand_flattened"]),
            ratio_cells("per_key_loop", "hand_flattened", None, at_least=True),
            "",
            vs_devlayer("hand_flattened"),
        ],
        [
            "context: hand-flattened + in-place write-back (_foreach_copy_)",
            med_range(r["hand_flattened_in_place"]),
            ratio_cells("per_key_loop", "hand_flattened_in_place", None, at_least=True),
            ratio_cells("hand_flattened_in_place", "hand_flattened", None, at_least=False),
            vs_devlayer("hand_flattened_in_place"),
        ],
        [
            'devlayer.all_reduce(dict, op="mean")',
            med_range(r["devlayer"]),
            ratio_cells("per_key_loop", "devlayer", TARGET_DICT_SPEEDUP, at_least=True),
            ratio_cells("devlayer", "hand_flattened", TARGET_DICT_VS_FLAT, at_least=False),
            "",
        ],
    ]
    for p in peers:
        if p.mean is None:
            rows.append([p.label, p.skipped or "", "", "", ""])
            continue
        rows.append(
            [
                p.label,
                med_range(r[p.impl]),
                ratio_cells("per_key_loop", p.impl, None, at_least=True),
                ratio_cells(p.impl, "hand_flattened", None, at_least=False),
                vs_devlayer(p.impl),
            ]
        )
    head = [
        "implementation",
        "µs/call",
        "speedup vs per-key loop: repeats median [min, max]; rounds median (95 % CI)",
        "ratio vs hand-flattened: same layout",
        "ratio vs devlayer (> 1: devlayer faster): same layout",
    ]
    note = (
        "Peer libraries are timed only where installed, each on the process group this "
        "script created, after its result matched devlayer's mean on every rank."
    )
    title = f"### mean of a dict of {N_METRICS} float32 scalar tensors"
    return f"{title}\n\n{note}\n\n" + table(head, rows)


# --------------------------------------------------------------------------- environment


def environment(st: devlayer.State) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "type": "environment",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "cpu_model": cpu,
        "cpu_cores": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "devlayer": devlayer.__version__,
        **_peer_versions(),
        "backend": st.backend,
        "device": str(st.device),
        "comm": st.comm,
        "world_size": st.world_size,
        "loadavg_start": _loadavg(),
        "git": git_state(),
    }


# The peers' distributions (the metric_dict section), as installed; None when not installed.
PEER_DISTRIBUTIONS = {
    "accelerate": ("accelerate",),
    "lightning": ("lightning", "lightning-fabric"),
    "pytorch_ignite": ("pytorch-ignite",),
}


def _peer_versions() -> dict[str, str | None]:
    """Versions from package metadata: cheap, and importing nothing."""
    out: dict[str, str | None] = {}
    for key, names in PEER_DISTRIBUTIONS.items():
        out[key] = None
        for name in names:
            try:
                version = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                continue
            out[key] = version if name == names[0] else f"{version} ({name})"
            break
    return out


def _loadavg() -> str | None:
    """The 1/5/15-minute load average: other work on the machine shows up as noise."""
    try:
        with open("/proc/loadavg", encoding="utf-8") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return None


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer sizes, repeats and iterations")
    p.add_argument("--json", metavar="PATH", help="write raw records (JSON lines) to PATH")
    p.add_argument("--repeats", type=int, help="repeats per case (default 9; quick: 5)")
    p.add_argument("--rounds", type=int, help="interleaved rounds per repeat (default 6; quick 3)")
    p.add_argument(
        "--block-s", type=float, help="target seconds per timed block (default 0.015; quick 0.01)"
    )
    p.add_argument(
        "--sections",
        type=_sections,
        default=list(SECTIONS),
        metavar="NAMES",
        help=f"comma-separated sections to run, always in this order: {','.join(SECTIONS)} "
        "(default: all)",
    )
    p.add_argument(
        "--sizes",
        type=_sizes,
        metavar="BYTES",
        help="comma-separated all_reduce sizes in bytes, e.g. 4,1048576 (default: the "
        "section's own)",
    )
    return p.parse_args(argv)


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(n < 4 or n % 4 for n in sizes):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected comma-separated byte counts, multiples of 4, e.g. 4,1048576"
        )
    return sizes


SECTIONS = ("all_reduce", "metric_dict", "numbers", "all_gather", "broadcast")


def _sections(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a comma-separated subset of {', '.join(SECTIONS)}"
        )
    return [n for n in SECTIONS if n in names]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    st = devlayer.init()
    try:
        if st.world_size < 2:
            print(
                "benchmarks/collectives.py compares collectives between ranks; start it with\n"
                "  torchrun --standalone --nproc-per-node=2 benchmarks/collectives.py",
                file=sys.stderr,
            )
            return 2
        if args.quick:
            ar_sizes = [4, 4 * KiB, 1 * MiB, 16 * MiB]
            side_sizes = [4, 1 * MiB]
            repeats, rounds, block_s, warmup, max_iters = 5, 3, 0.01, 3, 500
        else:
            ar_sizes = [4**k for k in range(1, 14)]  # 4 B .. 64 MiB
            side_sizes = [4, 4 * KiB, 1 * MiB, 16 * MiB]
            repeats, rounds, block_s, warmup, max_iters = 9, 6, 0.015, 10, 5000
        ar_sizes = args.sizes or ar_sizes
        b = Bench(
            repeats=args.repeats or repeats,
            rounds=args.rounds or rounds,
            block_s=args.block_s or block_s,
            warmup=warmup,
            max_iters=max_iters,
        )
        env = environment(st)
        t0 = time.perf_counter()
        run_section = {
            "all_reduce": partial(bench_all_reduce, b, ar_sizes),
            "metric_dict": partial(bench_metric_dict, b),
            "numbers": partial(bench_numbers, b),
            "all_gather": partial(bench_all_gather, b, side_sizes),
            "broadcast": partial(bench_broadcast, b, side_sizes),
        }
        sections = [run_section[name]() for name in args.sections]
        env["wall_s"] = round(time.perf_counter() - t0, 1)
        env["loadavg_end"] = _loadavg()
        env["repeats"] = b.repeats
        env["rounds"] = b.rounds
        env["block_s"] = b.block_s
        env["quick"] = args.quick
        env["sections"] = args.sections
        if st.is_main:
            print(_report(env, sections))
            if args.json:
                _write_json(args.json, env, b.records)
        return 0
    finally:
        devlayer.shutdown()


def _report(env: dict[str, Any], sections: list[str]) -> str:
    peers = " · ".join(
        f"{key.replace('_', '-')} {env[key] or 'not installed'}" for key in PEER_DISTRIBUTIONS
    )
    picked = "" if env["sections"] == list(SECTIONS) else f", sections {','.join(env['sections'])}"
    head = (
        f"## devlayer collectives benchmark ({'quick' if env['quick'] else 'full'}{picked})\n\n"
        f"{env['date_utc']} · {env['cpu_model']} ({env['cpu_cores']} cores) · "
        f"backend {env['backend']} ({env['device']}) · comm {env['comm']} · "
        f"world {env['world_size']} · torch {env['torch']} · devlayer {env['devlayer']} "
        f"(git {env['git']}) · {peers} · "
        f"python {env['python']} · OMP_NUM_THREADS={env['omp_num_threads']} · "
        f"load average {env['loadavg_start']} (start), {env['loadavg_end']} (end)\n\n"
        f"Times: µs per call, slowest rank, median of {env['repeats']} repeats of "
        f"{env['rounds']} interleaved rounds "
        f"[min, max]. Overhead = devlayer/raw - 1: the median [min, max] of the per-repeat "
        f"ratios, and the median with a distribution-free 95 % confidence interval of the "
        f"per-round ratios (implementations timed back to back). A target counts as met or "
        f"MISSED only when that whole interval is on one side of it.\n\n"
        f"Targets: overhead <= {TARGET_OVERHEAD_SMALL * 100:.0f} % at 4 B, "
        f"<= {TARGET_OVERHEAD_LARGE * 100:.0f} % at >= 1 MiB; metric dict >= "
        f"{TARGET_DICT_SPEEDUP:.0f}x the per-key loop and <= {TARGET_DICT_VS_FLAT:.1f}x "
        f"hand-flattened.\n"
    )
    return "\n\n".join([head, *sections, f"Benchmark wall time: {env['wall_s']} s\n"])


def _write_json(path: str, env: dict[str, Any], records: list[dict[str, Any]]) -> None:
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for rec in [env, *records]:
            f.write(json.dumps(rec) + "\n")
    print(f"wrote {len(records) + 1} records to {path}")


if __name__ == "__main__":
    sys.exit(main())
