"""Trainer argument checks that need real ranks (issue 20, R5-A3 and R5-A4), on gloo."""

from __future__ import annotations

import functools

import pytest

from devlayer.devices import usable_cpus
from devlayer.testing import run_ranks
from tests.dist import trainer_args_worker as worker

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]


@pytest.mark.skipif(usable_cpus() < 2, reason="needs 2 CPUs: 2 ranks on 1 CPU share 1 worker")
def test_r5_a3_two_local_ranks_divide_the_cpus_for_num_workers(clean_env):
    """R5-A3: num_workers equal to the process's CPUs passes at construction silently, but 2
    local ranks share those CPUs: fit() warns on both ranks alike, naming the CPUs per rank
    and the 2 local ranks, and trains with the workers asked for."""
    results = run_ranks(worker.num_workers_per_rank, 2, timeout=180)
    per_rank = max(usable_cpus() // 2, 1)
    for r in results:
        assert r["error"] is None and r["steps"] > 0, r
        assert f"num_workers={usable_cpus()} is more than the" in r["warning"], r
        assert f"the {per_rank} CPU(s) this rank may use, shared by 2 local ranks" in r["warning"]
    assert results[0]["warning"] == results[1]["warning"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_r5_a4_an_optimizer_of_another_model_is_refused_on_every_rank(clean_env, strategy):
    """R5-A4: under DDP and FSDP (which rebinds the optimizer to the shards) an optimizer
    built on another model's parameters is refused by fit() on every rank before the first
    step, naming how many of the model's trainable parameters it holds; weights unchanged."""
    results = run_ranks(functools.partial(worker.foreign_optimizer, strategy), 2, timeout=180)
    for r in results:
        assert r["error"] is not None, r
        assert "holds 0 of the model's 4 trainable parameters" in r["error"]
        assert r["unchanged"] and r["steps"] == 0
    assert results[0]["error"] == results[1]["error"]
