"""Strategies as objects (issue 21, item 1): names, checkpoint state, old checkpoints."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

import devlayer
from devlayer.errors import InvalidArgumentError
from devlayer.train import CheckpointStore
from devlayer.train.sharded import restore_state, training_state
from devlayer.train.strategy import DDPStrategy, FSDPStrategy, Strategy, from_name
from tests.helpers import ROOT, toy_trainer

#: A checkpoint written by the code before strategy objects (commit d5b2c56), by
#: ``_run(folder, 6)`` below: payload ``model`` from ``module.state_dict()``, ``optimizer``
#: from ``optimizer.state_dict()`` (parameters numbered 0..n).
OLD_CHECKPOINT = ROOT / "tests" / "unit" / "data" / "ddp_checkpoint_d5b2c56"


def _run(folder: Path, max_steps: int) -> torch.nn.Module:
    """Adam on a Linear(2, 1), 4 steps an epoch, a checkpoint every 2 steps."""
    torch.manual_seed(0)
    x = torch.linspace(-1, 1, 64).reshape(32, 2)
    y = x.sum(dim=1, keepdim=True) * 0.5
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    trainer = toy_trainer(net, opt, max_steps=max_steps, checkpoint_dir=folder, checkpoint_every=2)
    trainer.fit(TensorDataset(x, y))
    devlayer.shutdown()
    return net


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ({"strategy": "ddp"}, DDPStrategy),
        ({"strategy": "fsdp", "fsdp": {"min_params": 3}}, FSDPStrategy),
        ({"strategy": "fsdp", "fsdp": {"precision": "bf16-mixed"}}, FSDPStrategy),
    ],
)
def test_a21_t1_from_name_builds_the_strategy_object(args, expected):
    """A21-T1: ``from_name`` turns the ``strategy=`` names into their objects, with options."""
    chosen = from_name(args.pop("strategy"), **args)
    assert type(chosen) is expected
    if expected is FSDPStrategy:
        assert chosen.options == args["fsdp"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"strategy": "zero3"}, "strategy='zero3': use 'ddp' or 'fsdp'"),
        ({"strategy": 10**5000}, "strategy=an int of 16610 bits: use 'ddp' or 'fsdp'"),
        ({"strategy": "ddp", "fsdp": {}}, "fsdp= options need strategy='fsdp'"),
        ({"strategy": "fsdp", "ddp": {"bucket_cap_mb": 1}}, "['bucket_cap_mb'] with strategy"),
        (
            {"strategy": "fsdp", "fsdp": {"precision": "bf16-mixed"}, "trainer": True},
            "pass precision='bf16-mixed' to the Trainer instead",
        ),
        ({"strategy": DDPStrategy(), "fsdp": {}}, "takes its options itself"),
    ],
)
def test_a21_t1_from_name_refuses_what_the_strategy_cannot_take(args, message):
    """A21-T1: one place checks the strategy options (the Trainer's and prepare_model's)."""
    with pytest.raises(InvalidArgumentError, match=re.escape(message)):
        from_name(args.pop("strategy"), **args)


def test_a21_t1_a_strategy_object_is_taken_as_it_is():
    """A21-T1: ``Trainer(strategy=obj)`` keeps the object; its name needs no registration."""

    class Mine(DDPStrategy):
        name = "mine"

    mine = Mine()
    net = torch.nn.Linear(1, 1)
    trainer = devlayer.Trainer(
        net, torch.optim.SGD(net.parameters(), lr=0.1), torch.nn.functional.mse_loss, strategy=mine
    )
    assert trainer.strategy is mine and from_name(mine) is mine
    assert isinstance(from_name("ddp"), Strategy)


def test_a21_t3_a_ddp_checkpoint_written_before_strategies_resumes_bitwise(clean_env, tmp_path):
    """A21-T3: the checkpoint in tests/unit/data, written by the code before strategy objects
    (optimizer state numbered, not named), resumes under the new code to the same weights,
    bit for bit, as a run that never stopped."""
    old = tmp_path / "old"
    shutil.copytree(OLD_CHECKPOINT, old)
    payload, _ = CheckpointStore(old).load()
    assert payload["optimizer"]["param_groups"][0]["params"] == [0, 1]  # the old form
    resumed = _run(old, 10)
    straight = _run(tmp_path / "straight", 10)
    assert all(
        torch.equal(a, b) for a, b in zip(resumed.parameters(), straight.parameters(), strict=True)
    )
    new, _ = CheckpointStore(old).load()
    assert list(new["model"]) == list(payload["model"]) == ["weight", "bias"]


def test_a21_t4_checkpoint_state_keeps_the_module_names_under_a_wrapper():
    """A21-T4: the state built on ``get_state_dict`` names the parameters as the plain
    module does, also through a wrapper (``torch.compile``); the optimizer state is keyed
    by those names, and loading it (through a wrapper too) restores both exactly."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    net(torch.ones(4, 2)).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model_state, optimizer_state = training_state(torch.compile(net), opt)
    assert (
        list(model_state) == list(net.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    )
    assert optimizer_state["param_groups"][0]["params"] == list(model_state)
    twin = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    twin_opt = torch.optim.Adam(twin.parameters(), lr=0.1)
    restore_state(torch.compile(twin), twin_opt, model_state, optimizer_state)
    for a, b in zip(net.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["exp_avg_sq"], twin_opt.state[b]["exp_avg_sq"])


#: if/elif conditions that decide by strategy: the strategy's methods do that now.
_STRATEGY_BRANCH = re.compile(
    r"\b(?:if|elif)\b(?:(?!\belse\b).)*\b(?:fsdp|sharded|is_sharded|strategy)\b"
)


@pytest.mark.parametrize(
    "module",
    [
        "trainer.py",
        "precision.py",
        "options.py",
        "model.py",
        "steps.py",
        "validation.py",
        "history.py",
        "loading.py",
        "lr_scaling.py",
        "export.py",
    ],
)
def test_a21_t5_the_trainer_modules_hold_no_strategy_branch(module):
    """A21-T5: no ``if`` in the Trainer, precision, options or prepare_model asks which
    strategy runs (the pattern finds the old ``if self.strategy == "fsdp"``)."""
    assert _STRATEGY_BRANCH.search('        if self.strategy == "fsdp":')
    assert _STRATEGY_BRANCH.search('"model": None if sharded else model.state_dict(),')
    text = (ROOT / "devlayer" / "train" / module).read_text()
    assert [line for line in text.splitlines() if _STRATEGY_BRANCH.search(line)] == []
