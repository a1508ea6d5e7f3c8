"""DDP's own gradient all_reduce in the collective ledger, on real gloo ranks (issue 22, H22-H*)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.dist import ddp_ledger_worker as worker
from tests.dist.ranks import spawn_clean

pytestmark = [pytest.mark.dist]


def _backward_line() -> str:
    """``ddp_ledger_worker.py:<line of loss.backward()>``: the site each record names."""
    from pathlib import Path

    lines = Path(worker.__file__).read_text().splitlines()
    number = next(i for i, text in enumerate(lines, 1) if "loss.backward()" in text)
    return f"ddp_ledger_worker.py:{number}"


@pytest.fixture(scope="module")
def three_ranks() -> list[dict[str, Any]]:
    """One job of 3 spawned gloo ranks (3: not a power of two, where numerics can differ)."""
    return spawn_clean(worker.three_rank_round, nprocs=3, timeout=60, join_timeout=240)


@pytest.mark.timeout(300)
def test_h22_h1_every_ddp_bucket_is_recorded_and_no_collective_is_added(three_ranks) -> None:
    """H22-H1: on 3 spawned gloo ranks, 3 steps of a model devlayer prepared record one
    ``ddp all_reduce`` per gradient bucket per step (1 bucket in the first step, 3 after
    DDP rebuilds them), numbered alike on every rank, each done, with its bucket index,
    shape and dtype, at the user's ``loss.backward()`` line; torch's profiler counts the
    same gloo collectives as for torch's own DDP without a hook (the hook adds none)."""
    first = three_ranks[0]["recorded"]["records"]
    assert [r["detail"].split(" [")[0] for r in first] == [
        "bucket 0",
        *(["bucket 0", "bucket 1", "bucket 2"] * 2),
    ], first
    for rank in three_ranks:
        got = rank["recorded"]
        calls = [(r["seq"], r["op"], r["detail"]) for r in got["records"]]
        assert calls == [(r["seq"], r["op"], r["detail"]) for r in first]
        assert {r["op"] for r in got["records"]} == {"ddp all_reduce"}
        assert all(r["state"] == "done" for r in got["records"]), got["records"]
        assert {r["site"] for r in got["records"]} == {_backward_line()}
        assert {r["function"] for r in got["records"]} == {"_train"}
        assert got["records"][0]["detail"].endswith(" float32")
        assert got["calls"] == got["plain_calls"], got
        assert got["calls"]["gloo:all_reduce"] == len(got["records"])
        assert got["hook"] == "record_bucket" and got["plain_hook"] is None
        assert got["after_plain"] == len(got["records"])  # torch's own DDP records nothing


@pytest.mark.timeout(300)
def test_h22_h2_recorded_ddp_trains_bit_for_bit_as_torchs_ddp(three_ranks) -> None:
    """H22-H2: after 3 SGD steps on 3 ranks (fresh gradients each step, as the Trainer
    and torch's zero_grad default give), the parameters of the recorded model equal those
    of torch's own DDP with the same options bit for bit. (torch's Python allreduce_hook,
    which divides where DDP's reducer multiplies by 1/world, does not: see docs/hangs.md.)"""
    for rank in three_ranks:
        assert rank["recorded"]["bitwise_equal"] is True


@pytest.mark.timeout(300)
def test_h22_h3_a_users_comm_hook_on_the_prepared_model_runs_and_is_recorded(
    three_ranks,
) -> None:
    """H22-H3: a user's ``register_comm_hook`` (torch's fp16 compression, through a
    counting wrapper) on the model devlayer prepared does not raise, is called once per
    bucket per step, is recorded as ``ddp <hook name>`` at the user's line, trains bit for
    bit as torch's own DDP with that hook, and a second registration is refused as DDP
    refuses it (InvalidArgumentError naming the first hook)."""
    for rank in three_ranks:
        got = rank["user"]
        assert got["calls"] == len(got["records"]) == 7, got
        assert {r["op"] for r in got["records"]} == {"ddp counting_fp16_hook"}
        assert all(r["state"] == "done" for r in got["records"])
        assert {r["site"] for r in got["records"]} == {_backward_line()}
        assert got["bitwise_equal"] is True
        assert "register_comm_hook was called already (with counting_fp16_hook)" in got["refused"]


@pytest.mark.timeout(300)
def test_h22_h7_static_graph_and_torch_compile_are_recorded(three_ranks) -> None:
    """H22-H7: a prepared model with ``static_graph=True`` and one under ``torch.compile``
    (DDP's own graph split) each record their one bucket per step, done, numbered alike on
    every rank."""
    first = three_ranks[0]["static_and_compiled"]
    assert [state for _, _, state in first["static"]] == ["done"] * 3, first
    assert [op for _, op, _ in first["compiled"]] == ["ddp all_reduce"] * 3, first
    assert all(rank["static_and_compiled"] == first for rank in three_ranks)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("setting", ["DEVLAYER_HANG_REPORTS", "DEVLAYER_DDP_LEDGER"])
def test_h22_h4_with_hang_reports_off_ddp_is_torchs_own(clean_env, setting: str) -> None:
    """H22-H4: with ``DEVLAYER_HANG_REPORTS=0``, or only ``DEVLAYER_DDP_LEDGER=0``, the
    prepared model has no comm hook (DDP's own logging data names none), keeps torch's
    ``register_comm_hook``, and the ledger holds no DDP record after training."""
    results = spawn_clean(
        worker.hang_reports_off,
        nprocs=2,
        timeout=60,
        join_timeout=180,
        env={setting: "0"},
    )
    for got in results:
        assert got == {"hook": None, "own_register": False, "records": []}, got
