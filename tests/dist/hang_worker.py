"""Rank functions for the hang-report tests (issue 22), run under devlayer.spawn."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import torch
import torch.distributed as dist

import devlayer
from devlayer import comm
from devlayer.ledger import Ledger, current
from tests.helpers import toy_trainer

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


def _stub_begin(self: Ledger, op: str, detail: object = None, depth: int = 1) -> list[Any]:
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


def stuck_in_user_code() -> None:
    import time

    while True:
        time.sleep(0.05)


def stuck_rank_one() -> None:
    """Rank 1 loops in user code while rank 0 waits in all_reduce."""
    devlayer.all_reduce(torch.ones(4))
    if devlayer.rank() == 1:
        stuck_in_user_code()
    devlayer.all_reduce(torch.ones(4))


def watchdog_round() -> dict[str, Any]:
    """One collective, then quiet past the watchdog (DEVLAYER_WATCHDOG=1); shutdown stops
    the watchdog thread; SIGTERM inside the Trainer's handler block still dumps."""
    import os
    import signal
    import threading
    import time

    from devlayer import hangdump
    from devlayer.train.signals import on_sigterm

    devlayer.all_reduce(torch.ones(2))
    setup = hangdump.current_setup()
    assert setup is not None
    dump = setup.folder / f"rank{devlayer.rank()}.json"
    deadline = time.monotonic() + 60
    while not dump.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    watchdog_reason = json.loads(dump.read_text())["reason"] if dump.exists() else None
    dump.unlink(missing_ok=True)
    caught: list[int] = []
    with on_sigterm(lambda signum, frame: caught.append(signum)):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
    term_reason = json.loads(dump.read_text())["reason"] if dump.exists() else None
    devlayer.barrier()
    devlayer.shutdown()
    alive = [t.name for t in threading.enumerate() if t.name == "devlayer-watchdog"]
    return {"watchdog": watchdog_reason, "term": term_reason, "caught": caught, "alive": alive}


def stuck_rank_two_of_four() -> None:
    """Rank 2 of 4 loops in user code while the others wait in all_reduce."""
    devlayer.all_reduce(torch.ones(4))
    if devlayer.rank() == 2:
        stuck_in_user_code()
    devlayer.all_reduce(torch.ones(4))


def rank_one_returns_early() -> None:
    """Rank 1 returns (exit code 0) before the all_reduce rank 0 waits in."""
    devlayer.all_reduce(torch.ones(4))
    if devlayer.rank() == 1:
        return
    devlayer.all_reduce(torch.ones(4))


def barrier_against_all_reduce() -> None:
    """Rank 0 calls barrier where rank 1 calls all_reduce (barrier is not checked)."""
    devlayer.all_reduce(torch.ones(4))
    t = torch.ones(4)
    devlayer.barrier() if devlayer.rank() == 0 else devlayer.all_reduce(t)


class _StuckAtStep:
    """A training_step that loops in user code on rank 1 at its 4th call."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, model: Any, batch: Any) -> Any:
        self.calls += 1
        if devlayer.rank() == 1 and self.calls == 4:
            stuck_in_user_code()
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)


def trainer_stuck_in_step() -> None:
    """A 2-rank Trainer whose rank 1 hangs inside its training_step at the 4th step."""
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = TensorDataset(torch.rand(64, 4), torch.rand(64, 1))
    trainer = toy_trainer(
        model,
        opt,
        None,
        training_step=_StuckAtStep(),
        batch_size=4,
        max_epochs=1,
        num_workers="auto",
    )
    trainer.fit(data)


def devlayer_threads() -> list[str]:
    """The names of devlayer's threads in this rank (after spawn's init())."""
    import threading

    return sorted(t.name for t in threading.enumerate() if t.name.startswith("devlayer-"))
