"""Rank functions for the hang-report tests (issue 22), run under devlayer.spawn."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.distributed as dist

import devlayer
from devlayer import comm
from devlayer.ledger import Ledger, current

_COUNTED = (
    "all_reduce",
    "broadcast",
    "all_gather_single",
    "all_gather_into_tensor",
    "monitored_barrier",
    "barrier",
    "all_gather_object",
    "broadcast_object_list",
)


def _every_collective() -> None:
    devlayer.all_reduce(torch.ones(4))
    devlayer.all_reduce({"a": 1.0, "b": torch.ones(2)})
    devlayer.all_gather(torch.ones(3))
    devlayer.broadcast(torch.ones(2))
    devlayer.barrier()
    devlayer.all_gather_object({"x": 1})
    devlayer.broadcast_object([1, 2])
    comm.vote_any(False).result()


def _counting(counts: Counter[str]) -> dict[str, Any]:
    saved = {}
    for name in _COUNTED:
        if hasattr(dist, name):
            real = getattr(dist, name)
            saved[name] = real

            def counted(*a: Any, _real: Any = real, _name: str = name, **k: Any) -> Any:
                counts[_name] += 1
                return _real(*a, **k)

            setattr(dist, name, counted)
    return saved


def _stub_begin(self: Ledger, op: str, detail: object = None) -> list[Any]:
    return [0, op, detail, None, 0, 0.0, 0.0, "running"]


def count_with_and_without_ledger() -> dict[str, Any]:
    """The torch.distributed calls of one run of every collective, with the ledger and with
    its recording replaced by a stub; and the ledger's records of the first run."""
    with_ledger: Counter[str] = Counter()
    saved = _counting(with_ledger)
    comm._ctx_cache = None  # the context caches all_gather's function: rebuild it counted
    try:
        _every_collective()
        led = current()
        assert led is not None
        records = led.tail()
        without: Counter[str] = Counter()
        for name, real in saved.items():
            setattr(dist, name, real)
        _counting(without)
        comm._ctx_cache = None
        real_begin = Ledger.begin
        Ledger.begin = _stub_begin  # type: ignore[method-assign]
        try:
            _every_collective()
        finally:
            Ledger.begin = real_begin  # type: ignore[method-assign]
    finally:
        for name, real in saved.items():
            setattr(dist, name, real)
    return {"with": dict(with_ledger), "without": dict(without), "records": records}
