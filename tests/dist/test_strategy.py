"""A strategy is one class: a toy one, defined in the test, trains on 2 gloo ranks."""

from __future__ import annotations

import pytest

from devlayer.testing import run_ranks
from tests.dist import strategy_worker as worker

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]


def test_a21_t2_a_strategy_defined_in_a_test_trains_checkpoints_and_resumes(clean_env, tmp_path):
    """A21-T2: ``Trainer(strategy=CompressedDDP())``, a DDP subclass with an fp16 gradient
    compression hook defined in the test worker, trains 2 gloo ranks: its hook runs once per
    optimizer step (one bucket), the replicas stay identical, its checkpoints hold the plain
    module's parameter names (no DDP ``module.`` prefix), and a run stopped at step 3 and
    resumed by a new Trainer with a new strategy object ends bitwise equal to a straight
    run."""
    r0, r1 = run_ranks(worker.compressed_train_and_resume, 2, str(tmp_path), timeout=240)
    for r in (r0, r1):
        assert r["wrapper"] == "DistributedDataParallel"
        assert r["steps"] == 6 and r["calls"] == 6, r
        assert r["resumed_calls"] == 3, r  # steps 4 to 6 only: the rest came from the file
        assert r["resumed_from"].endswith("step-000000003"), r
        assert r["resumed"] == r["straight"]
    assert r0["straight"] == r1["straight"]
    assert r0["saved_keys"] == r0["model_keys"] == ["0.bias", "0.weight", "2.bias", "2.weight"]
