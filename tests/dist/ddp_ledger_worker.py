"""Rank functions for the DDP-in-the-ledger tests (issue 22, H22-H*), run under devlayer.spawn."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

import devlayer
from devlayer.comm import collective_ledger
from devlayer.errors import InvalidArgumentError
from devlayer.train.strategy import DDP_DEFAULTS

STEPS = 3
#: DDP's bucket cap: the model's ~3 MB of gradients make several buckets.
BUCKET_MB = 1.0


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(3):
        layers += [torch.nn.Linear(512, 512), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(512, 1))


def _train(model: Any, rank: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(STEPS):
        loss = model(torch.randn(8, 512, generator=gen)).pow(2).mean()
        loss.backward()  # the user's line the ledger names (BACKWARD_LINE)
        opt.step()
        opt.zero_grad(set_to_none=True)


def _gloo_calls(model: Any, rank: int) -> dict[str, int]:
    """Train ``model`` and count the comm backend's collectives, as torch's profiler sees
    them: DDP's C++ default path calls no Python function that could be counted."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _train(model, rank)
    return dict(Counter(e.name for e in prof.events() if e.name.startswith("gloo:")))


def _params(model: Any) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _ddp_records(start: int) -> list[dict[str, Any]]:
    return [r for r in collective_ledger().tail() if r["seq"] >= start and "ddp" in r["op"]]


def recorded_and_plain() -> dict[str, Any]:
    """The same training with devlayer's DDP (recorded) and torch's own DDP (no hook):
    the ledger's records, the collectives counted in each, the parameters of each."""
    rank = devlayer.rank()
    start = collective_ledger().n
    recorded = devlayer.prepare_model(_model(), bucket_cap_mb=BUCKET_MB)
    calls = _gloo_calls(recorded, rank)
    records = _ddp_records(start)
    plain = DistributedDataParallel(_model(), bucket_cap_mb=BUCKET_MB, **DDP_DEFAULTS)
    plain_calls = _gloo_calls(plain, rank)
    same = all(torch.equal(a, b) for a, b in zip(_params(recorded), _params(plain), strict=True))
    return {
        "records": records,
        "calls": calls,
        "plain_calls": plain_calls,
        "bitwise_equal": same,
        "hook": recorded._get_ddp_logging_data().get("comm_hook"),
        "plain_hook": plain._get_ddp_logging_data().get("comm_hook"),
        "after_plain": len(_ddp_records(start)),
    }


def user_hook_round() -> dict[str, Any]:
    """A user registers torch's fp16 compression hook (through a counting wrapper) on the
    prepared model: it runs, is recorded, trains as on torch's own DDP, and a second
    registration is refused."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    calls: Counter[str] = Counter()

    def counting_fp16_hook(state: Any, bucket: Any) -> Any:
        calls["hook"] += 1
        return default_hooks.fp16_compress_hook(state, bucket)

    counting_fp16_hook.__annotations__ = {}  # torch checks them (PEP 563 makes strings)
    rank = devlayer.rank()
    start = collective_ledger().n
    model = devlayer.prepare_model(_model(), bucket_cap_mb=BUCKET_MB)
    model.register_comm_hook(None, counting_fp16_hook)
    _train(model, rank)
    refused = ""
    try:
        model.register_comm_hook(None, counting_fp16_hook)
    except InvalidArgumentError as exc:
        refused = str(exc)
    plain = DistributedDataParallel(_model(), bucket_cap_mb=BUCKET_MB, **DDP_DEFAULTS)
    plain.register_comm_hook(None, default_hooks.fp16_compress_hook)
    _train(plain, rank)
    same = all(torch.equal(a, b) for a, b in zip(_params(model), _params(plain), strict=True))
    return {
        "calls": calls["hook"],
        "records": _ddp_records(start),
        "bitwise_equal": same,
        "refused": refused,
    }


def hang_reports_off() -> dict[str, Any]:
    """With DEVLAYER_HANG_REPORTS=0 the prepared model is torch's DDP as it is."""
    model = devlayer.prepare_model(_model(), bucket_cap_mb=BUCKET_MB)
    _train(model, devlayer.rank())
    return {
        "hook": model._get_ddp_logging_data().get("comm_hook"),
        "own_register": "register_comm_hook" in vars(model),
        "records": _ddp_records(0),
    }


def static_and_compiled() -> dict[str, list[tuple[int, str, str]]]:
    """Records of 3 steps of a prepared model with ``static_graph=True`` (its first
    backward reduces every bucket from a callback at its end) and under ``torch.compile``
    (DDP's graph split per bucket; ``aot_eager``: no C++ toolchain needed)."""
    out = {}
    for name, options, backend in (
        ("static", {"static_graph": True}, None),
        ("compiled", {}, "aot_eager"),
    ):
        torch.manual_seed(0)
        start = collective_ledger().n
        model = devlayer.prepare_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), **options)
        run = torch.compile(model, backend=backend) if backend else model
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(STEPS):
            run(torch.rand(4, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
        out[name] = [(r["seq"], r["op"], r["state"]) for r in _ddp_records(start)]
    return out


def three_rank_round() -> dict[str, Any]:
    """The rounds above in one job."""
    return {
        "recorded": recorded_and_plain(),
        "user": user_hook_round(),
        "static_and_compiled": static_and_compiled(),
    }
