"""Resume at a changed world size (issue 23), the pure parts: the global order of an epoch,
the re-derived batch plan, what is refused. The real-process runs: tests/dist/test_elastic.py.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    SequentialSampler,
    TensorDataset,
    WeightedRandomSampler,
)

import devlayer
from devlayer.errors import InvalidArgumentError
from devlayer.launchers import ProcessInfo, detect
from devlayer.testing import slurm_env, torchrun_env
from devlayer.train.data import GlobalOrder
from devlayer.train.elastic import (
    BatchPlan,
    check_resumable_data,
    data_position,
    grow_back_warning,
    keep_global_batch,
    plan_world_change,
    rescaled_plan,
)
from devlayer.train.errors import CheckpointCorruptError, WorldSizeChangeError
from tests.helpers import toy_trainer


@pytest.fixture
def cpu(clean_env):
    with devlayer.init(backend="cpu") as st:
        yield st


def _steps(n: int, plan: BatchPlan, seed: int = 7, epoch: int = 1) -> list[Counter[int]]:
    """Per optimizer step, the multiset of indices all ranks train on under ``plan``."""
    world, b, accum = plan.world_size, plan.per_rank_batch, plan.grad_accum
    shards = []
    for rank in range(world):
        order = GlobalOrder(n, world, rank, True, seed, plan.global_batch)
        order.set_epoch(epoch)
        shards.append(list(order))
    steps = len(shards[0]) // (b * accum)
    return [
        Counter(i for shard in shards for i in shard[s * b * accum : (s + 1) * b * accum])
        for s in range(steps)
    ]


@pytest.mark.parametrize("n", [1, 7, 96, 100])
def test_e23_1_every_world_size_trains_each_step_on_the_same_samples(n):
    """E23-1: the epoch's global order padded to a multiple of the global batch gives every
    optimizer step the same multiset of samples at every world size and split of the
    global batch 8 (per-rank batch x world x accumulation), and every sample at least once."""
    reference = _steps(n, BatchPlan(8, 1, 1))
    for plan in (BatchPlan(4, 1, 2), BatchPlan(2, 2, 2), BatchPlan(1, 1, 8), BatchPlan(1, 2, 4)):
        assert _steps(n, plan) == reference, plan
    assert set().union(*reference) == set(range(n))
    assert all(sum(step.values()) == 8 for step in reference)


@pytest.mark.parametrize(("n", "world"), [(10, 1), (97, 2), (100, 3), (5, 4)])
def test_e23_1_with_the_world_size_as_multiple_it_is_torchs_distributed_sampler(n, world):
    """E23-1: with ``multiple=world`` (what prepare_loader does by default) the order is
    exactly torch's DistributedSampler, padded or cut, so runs that do not ask for the
    step padding are unchanged."""
    for rank in range(world):
        for drop_last in (False, True):
            theirs = DistributedSampler(
                range(n), num_replicas=world, rank=rank, seed=3, drop_last=drop_last
            )
            ours = GlobalOrder(n, world, rank, True, 3, world, drop_last)
            theirs.set_epoch(2)
            ours.set_epoch(2)
            assert list(ours) == list(theirs) and len(ours) == len(theirs)


def test_e23_1_the_loader_continues_at_a_global_position(cpu):
    """E23-1: ``skip_samples(n)`` starts the next iteration at position n of the epoch's
    global order; ``step_samples`` pads the epoch to whole global batches."""
    data = TensorDataset(torch.arange(10.0))
    loader = devlayer.prepare_loader(data, 4, num_workers=0, seed=5, step_samples=4)
    whole = [x for (b,) in loader for x in b.tolist()]
    assert len(whole) == 12 and set(whole) == set(map(float, range(10)))
    loader.set_epoch(0)
    loader.skip_samples(8)
    assert [x for (b,) in loader for x in b.tolist()] == whole[8:]
    plain = devlayer.prepare_loader(data, 4, num_workers=0)
    assert [len(b) for (b,) in plain] == [4, 4, 2]  # without step_samples: as before
    with pytest.raises(InvalidArgumentError, match="step_samples=0"):
        devlayer.prepare_loader(data, 4, num_workers=0, step_samples=0)
    exact = devlayer.prepare_loader(data, 4, num_workers=0, pad=False)
    with pytest.raises(InvalidArgumentError, match="no global order"):
        exact.skip_samples(4)


@pytest.mark.parametrize(
    ("saved", "world", "expected"),
    [
        (BatchPlan(32, 1, 2), 1, BatchPlan(32, 2, 1)),  # fewer ranks: accumulate more
        (BatchPlan(32, 1, 2), 4, BatchPlan(16, 1, 4)),  # more ranks: smaller batches
        (BatchPlan(16, 2, 2), 4, BatchPlan(16, 1, 4)),  # ... or less accumulation
        (BatchPlan(4, 3, 2), 3, BatchPlan(4, 2, 3)),
        (BatchPlan(5, 1, 2), 5, BatchPlan(2, 1, 5)),
        (BatchPlan(3, 1, 4), 6, BatchPlan(2, 1, 6)),
        (BatchPlan(8, 1, 2), 2, BatchPlan(8, 1, 2)),  # unchanged
    ],
)
def test_e23_2_the_global_batch_is_kept_with_no_larger_per_rank_batch(saved, world, expected):
    """E23-2: at another world size the global batch stays; the per-rank micro-batch is the
    largest divisor of the new per-rank share not above the saved one (no more memory per
    rank), the accumulation makes up the rest."""
    plan = keep_global_batch(saved, world)
    assert plan == expected
    assert plan.global_batch == saved.global_batch
    assert plan.per_rank_batch <= saved.per_rank_batch


def test_e23_2_a_global_batch_that_does_not_split_is_refused_naming_the_numbers():
    """E23-2: global batch 8 over 3 ranks cannot be kept: the error names the saved plan, the
    world size, the sizes that work and the opt-in; the opt-in keeps the per-rank batch and
    gives the LR factor."""
    with pytest.raises(WorldSizeChangeError) as info:
        keep_global_batch(BatchPlan(4, 1, 2), 3)
    text = str(info.value)
    assert "per-rank batch 4 x world 2 x grad_accum 1 = 8" in text
    assert "world_size=3" in text and "(1, 2, 4, 8)" in text and "'rescale_lr'" in text
    assert rescaled_plan(BatchPlan(4, 1, 2), 3) == (BatchPlan(4, 1, 3), 1.5)


def _payload(world: int, plan: BatchPlan | None, batches_done: int) -> dict:
    ranks = [{"loss_sum": 1.5 * (r + 1), "samples": 10 * (r + 1)} for r in range(world)]
    payload = {"epoch": 1, "global_step": 17, "ranks": ranks, "batches_done": batches_done}
    if plan is not None:
        payload["data"] = data_position(7, 1, batches_done, plan)
    return payload


def test_e23_2_the_position_and_the_running_sums_carry_over():
    """E23-2: 2 ranks x batch 4 at micro-batch 6 (48 samples) continue on 1 rank at its
    micro-batch 12 (batch 4, grad_accum 2); the old ranks' running loss sums land on rank 0
    (the epoch's mean stays exact); another seed (another data order) is refused; a
    checkpoint without a position restarts the epoch."""
    payload = _payload(2, BatchPlan(4, 1, 2), 6)
    change = plan_world_change(payload, world=1, rank=0, mode=True, seed=7)
    assert change.new == BatchPlan(4, 2, 1) and change.batches_done == 12
    assert (change.epoch, change.step, change.sums) == (1, 17, (4.5, 30))
    assert plan_world_change(payload, world=4, rank=3, mode=True, seed=7).sums == (0.0, 0)
    with pytest.raises(WorldSizeChangeError, match=r"seed=7, this run has seed=8.*pass seed=7"):
        plan_world_change(payload, world=1, rank=0, mode=True, seed=8)
    old = plan_world_change(_payload(2, None, 6), world=1, rank=0, mode=True, seed=7)
    assert (
        old.new is None
        and old.batches_done == 0
        and old.record()["rederived"]
        == {"data": "the interrupted epoch restarts (checkpoint without position)"}
    )


def test_e23_3_rescale_inside_an_epoch_is_refused_when_the_position_would_move():
    """E23-3: with the opt-in the global batch changes (8 -> 12): 40 samples into the epoch
    is not a whole number of new steps, so it is refused (naming the position and the
    fix); at a whole number (0, an epoch's end) it continues with the LR factor."""
    with pytest.raises(WorldSizeChangeError, match=r"sample 40 of epoch 1.*epoch's end"):
        plan_world_change(
            _payload(2, BatchPlan(4, 1, 2), 5), world=3, rank=0, mode="rescale_lr", seed=7
        )
    change = plan_world_change(
        _payload(2, BatchPlan(4, 1, 2), 0), world=3, rank=0, mode="rescale_lr", seed=7
    )
    assert change.new == BatchPlan(4, 1, 3) and change.lr_factor == 1.5


class _Stream(IterableDataset):
    def __iter__(self):
        return iter(range(8))

    def __len__(self) -> int:
        return 8


def test_e23_3_data_whose_position_cannot_be_carried_is_refused(cpu):
    """E23-3: a ShardedLoader (split for its world size), a DataLoader with its own sampler
    or batch sampler, and an IterableDataset (even with __len__) are refused with an error
    naming what was passed and what to pass; a Dataset or a plain shuffling DataLoader
    passes."""
    data = TensorDataset(torch.arange(8.0))
    with pytest.raises(WorldSizeChangeError, match=r"ShardedLoader.*pass the Dataset"):
        check_resumable_data(devlayer.prepare_loader(data, 4, num_workers=0))
    weighted = DataLoader(data, 4, sampler=WeightedRandomSampler([1.0] * 8, 8))
    with pytest.raises(WorldSizeChangeError, match=r"own sampler \(WeightedRandomSampler\)"):
        check_resumable_data(weighted)

    class MyBatches(BatchSampler):
        pass

    batches = DataLoader(data, batch_sampler=MyBatches(SequentialSampler(data), 4, False))
    with pytest.raises(WorldSizeChangeError, match=r"own sampler \(MyBatches\)"):
        check_resumable_data(batches)
    check_resumable_data(data)
    check_resumable_data(DataLoader(data, 4, shuffle=True))
    with pytest.raises(InvalidArgumentError, match="_Stream, whose position"):
        devlayer.prepare_loader(_Stream(), 4, num_workers=0)


@pytest.mark.parametrize(
    "value",
    [
        {"seed": 0, "epoch": 0, "consumed": -8, "per_rank_batch": 4, "grad_accum": 1},
        {
            "seed": 0,
            "epoch": 0,
            "consumed": 8,
            "per_rank_batch": 0,
            "grad_accum": 1,
            "world_size": 2,
        },
        {
            "seed": 0,
            "epoch": 0,
            "consumed": 8.0,
            "per_rank_batch": 4,
            "grad_accum": 1,
            "world_size": 2,
        },
        "x",
    ],
    ids=["missing", "zero-batch", "float", "str"],
)
def test_e23_1_a_forged_data_position_is_refused(value, tmp_path):
    """E23-1: a payload's ``data`` entry of the wrong shape is refused before anything is
    applied, naming the field and what was expected."""
    from devlayer.train.resume import TrainingCheckpoints
    from devlayer.train.rng import rng_state

    net = torch.nn.Linear(2, 1)
    payload = {
        "model": net.state_dict(),
        "epoch": 0,
        "batches_done": 2,
        "global_step": 4,
        "ranks": [{"rng": rng_state(), "loss_sum": 0.0, "samples": 0}],
        "data": data_position(0, 0, 2, BatchPlan(4, 1, 1)),
    }
    checkpoints = TrainingCheckpoints(tmp_path)
    manifest = {"step": 4, "world_size": 1}
    checkpoints.check_payload(payload, manifest, net, tmp_path)
    with pytest.raises(CheckpointCorruptError, match=re.escape("field 'data'")):
        checkpoints.check_payload({**payload, "data": value}, manifest, net, tmp_path)


def test_e23_2_the_opt_in_is_checked_with_the_other_options():
    """E23-2: ``allow_world_size_change`` takes True, False or "rescale_lr"; anything else
    is refused naming the value and the choices."""
    net = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    devlayer.Trainer(net, opt, torch.nn.functional.mse_loss, allow_world_size_change="rescale_lr")
    with pytest.raises(InvalidArgumentError, match=r"'rescale'.*'rescale_lr'"):
        devlayer.Trainer(net, opt, torch.nn.functional.mse_loss, allow_world_size_change="rescale")


# --------------------------------------------------------------------------- growing back


def _torchrun(**kwargs: Any) -> ProcessInfo:
    return detect(torchrun_env(0, 2, **kwargs))


def test_l27_4_growing_back_under_the_shared_store_is_named_with_its_fix():
    """L27-4: ``grow_back_warning`` returns a text exactly when ``allow_world_size_change``
    is set (True or "rescale_lr"), the launcher is torchrun, its agent store is shared
    and restarts are allowed; the text names the variable that says so, why growing back
    fails and both fixes. Each condition off alone gives None."""
    bad = _torchrun(max_restarts=3)
    for allow in (True, "rescale_lr"):
        text = grow_back_warning(bad, allow)
        assert text is not None
        for part in (
            f"allow_world_size_change={allow!r}",
            "TORCHELASTIC_USE_AGENT_STORE=True",
            "TORCHELASTIC_MAX_RESTARTS=3",
            "rejoins",
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun",
            "devlayer launch",
            "docs/checkpoints.md",
        ):
            assert part in text, (part, text)
    assert grow_back_warning(bad, False) is None
    assert grow_back_warning(_torchrun(max_restarts=0), True) is None
    assert grow_back_warning(_torchrun(max_restarts=3, agent_store=False), True) is None
    # Another launcher: torchrun's variables left in its environment are not its facts.
    stray = {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "3"}
    other = detect({**slurm_env(0, 2), **stray})
    assert other.launcher == "slurm"
    assert grow_back_warning(other, True) is None
    assert grow_back_warning(ProcessInfo(), True) is None
    assert grow_back_warning(_torchrun(max_restarts=3, agent_store=False), "rescale_lr") is None


def test_l27_4_no_warning_under_devlayer_launch(monkeypatch):
    """L27-4: ``devlayer launch`` sets ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, so torch's
    c10d handler does not share its store and tells the workers
    ``TORCHELASTIC_USE_AGENT_STORE=False``: no warning (without the variable torch says
    True, and the warning is due)."""
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
        DynamicRendezvousHandler,
    )

    shared = DynamicRendezvousHandler.use_agent_store.fget  # reads only the variable
    monkeypatch.delenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", raising=False)
    assert shared(None) is True
    assert grow_back_warning(_torchrun(max_restarts=3, agent_store=shared(None)), True)
    monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    assert shared(None) is False
    assert grow_back_warning(_torchrun(max_restarts=3, agent_store=shared(None)), True) is None


def _fit_under_torchrun(monkeypatch, allow: bool, times: int = 1, **env: Any) -> list[Any]:
    """``times`` fits of one Trainer at world size 1 with torchrun's variables set by hand;
    the WorldSizeChangeWarnings they raised."""
    import warnings

    from devlayer.testing import free_port
    from devlayer.train.errors import WorldSizeChangeWarning

    for name, value in torchrun_env(0, 1, master_port=free_port(), **env).items():
        monkeypatch.setenv(name, value)
    trainer = toy_trainer(batch_size=4, max_epochs=1, allow_world_size_change=allow)
    data = TensorDataset(torch.randn(8, 1), torch.randn(8, 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            for _ in range(times):
                trainer.fit(data)
        finally:
            devlayer.shutdown()
    return [w for w in caught if issubclass(w.category, WorldSizeChangeWarning)]


@pytest.mark.timeout(300)
def test_l27_4_the_trainer_warns_once_under_torchrun_with_the_shared_store(clean_env):
    """L27-4: a Trainer with ``allow_world_size_change=True`` under torchrun's variables
    (shared agent store, ``--max-restarts=3``) warns once with WorldSizeChangeWarning (a
    UserWarning) over two ``fit()`` calls, naming the fix; without the opt-in, with
    ``--max-restarts=0`` or without the shared store it does not warn."""
    from devlayer.train.errors import WorldSizeChangeWarning

    assert issubclass(WorldSizeChangeWarning, UserWarning)
    (found,) = _fit_under_torchrun(clean_env, True, times=2, max_restarts=3)
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun" in str(found.message)
    assert _fit_under_torchrun(clean_env, False, max_restarts=3) == []
    assert _fit_under_torchrun(clean_env, True, max_restarts=0) == []
    assert _fit_under_torchrun(clean_env, True, max_restarts=3, agent_store=False) == []
