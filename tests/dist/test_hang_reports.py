"""Hang reports on real gloo ranks (issue 22): the ledger, dumps, the verdict."""

from __future__ import annotations

import pytest

import devlayer
from tests.dist.hang_worker import count_with_and_without_ledger

pytestmark = [pytest.mark.dist]


@pytest.mark.timeout(240)
def test_h22_2_the_ledger_records_every_collective_and_adds_none(clean_env) -> None:
    """H22-2: on 2 spawned gloo ranks every devlayer collective (tensor, container, gather,
    broadcast, barrier, object collectives, vote) is recorded with the user's call site,
    and the torch.distributed calls are the same with the ledger as with its recording
    stubbed out: the ledger adds no collective."""
    results = devlayer.spawn(
        count_with_and_without_ledger, nprocs=2, backend="cpu", timeout=60, join_timeout=180
    )
    for r in results:
        assert r["with"] == r["without"] and sum(r["with"].values()) >= 8, r
        ops = [rec["op"] for rec in r["records"]]
        assert ops == [
            "all_reduce",
            "all_reduce",
            "all_gather",
            "broadcast",
            "barrier",
            "all_gather_object",
            "broadcast_object",
            "vote_any",
        ]
        assert [rec["seq"] for rec in r["records"]] == list(range(8))
        assert all(rec["state"] == "done" for rec in r["records"])
        assert {rec["site"].split(":")[0] for rec in r["records"]} == {"hang_worker.py"}
        assert r["records"][0]["detail"] == "[4] float32"
