"""The Trainer's arguments (issue 20, R5-A*): every one checked at construction, by name."""

from __future__ import annotations

import inspect
import os
import re
import warnings
from typing import Any

import pytest
import torch

import devlayer
from devlayer.errors import InvalidArgumentError
from devlayer.train import Callback, EarlyStopping
from devlayer.train.data import auto_num_workers, check_num_workers, max_num_workers
from tests.helpers import toy_data, toy_trainer

MSE = torch.nn.functional.mse_loss


@pytest.fixture
def cpu(clean_env):
    with devlayer.init(backend="cpu") as st:
        yield st


def _fn(model: Any, batch: Any) -> Any:
    return model(batch[0]).sum()


# argument -> (bad value, what the message must also say); one row per failure of issue 20
# and at least one per argument. The message must name the argument and the value it saw.
BAD: list[tuple[str, Any, str]] = [
    ("model", None, "torch.nn.Module"),
    ("model", "net", "torch.nn.Module"),
    ("optimizer", None, "optimizer"),
    ("optimizer", _fn, "optimizer"),
    ("loss_fn", 123, "callable"),
    ("precision", "fp8", "'32'"),
    ("grad_accum", "2", "int >= 1"),
    ("clip_grad", "1", "positive"),
    ("clip_grad", float("nan"), "positive"),
    ("clip_grad", 10**400, "positive"),
    ("max_epochs", 0, "int >= 1"),
    ("max_steps", 2.5, "int >= 1"),
    ("batch_size", True, "int >= 1"),
    ("batch_size", "16", "int >= 1"),
    ("batch_size", 10**30, "2**63"),
    ("batch_size", 0, "int >= 1"),
    ("lr_scaling", "cubic", "'linear'"),
    ("checkpoint_dir", 123, "path"),
    ("checkpoint_dir", "", "empty"),
    ("checkpoint_dir", "  ", "empty"),
    ("checkpoint_every", 0, "int >= 1"),
    ("checkpoint_async", "yes", "True or False"),
    ("resume", True, "'auto'"),
    ("resume", 123, "'auto'"),
    ("resume", "", "'auto'"),
    ("seed", 2**70, "2**63"),
    ("seed", None, "int"),
    ("seed", -1, "int"),
    ("seed", 1.5, "int"),
    ("early_stopping", object(), "EarlyStopping"),
    ("metrics_file", 123, "path"),
    ("metrics_file", "", "empty"),
    ("progress", "yes", "True or False"),
    ("progress_interval", -1, "seconds"),
    ("progress_interval", 10**400, "seconds"),
    ("callbacks", None, "Callback"),
    ("callbacks", [object()], "Callback"),
    ("callbacks", "cb", "Callback"),
    ("training_step", 123, "callable"),
    ("validation_step", "x", "callable"),
    ("scheduler", "x", "scheduler"),
    ("num_workers", -1, "'auto'"),
    ("num_workers", "4", "'auto'"),
    ("num_workers", 10**6, "CPU"),
    ("num_workers", 10**5000, "an int of 16610 bits"),
    ("log_every", 0, "int >= 1"),
    ("reference_throughput", 0, "positive"),
    ("reference_throughput", -5, "positive"),
    ("reference_throughput", "x", "positive"),
    ("reference_throughput", float("inf"), "positive"),
    ("allow_world_size_change", "no", "True, False or 'rescale_lr'"),
    ("preempt_check_every", 0, "int >= 1"),
    ("optimize", 123, "optimization_names()"),
    ("strategy", "zero3", "'ddp'"),
    ("fsdp", [1, 2], "dict"),
    ("fsdp", {"min_param": 5}, "min_params"),
    ("compile", "yes", "torch.compile"),
    ("loggers", "tensorboard", "list"),
    ("loggers", ["wandb"], "tensorboard"),
]


def test_r5_a1_the_table_covers_every_trainer_argument():
    """R5-A1: the bad-value table below has a row for every parameter of Trainer.__init__,
    so an argument added later without a check makes this test fail."""
    params = set(inspect.signature(devlayer.Trainer.__init__).parameters) - {"self"}
    assert params == {name for name, _, _ in BAD}


@pytest.mark.parametrize(
    ("name", "value", "fragment"), BAD, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD)]
)
def test_r5_a1_a_bad_argument_is_refused_at_construction_naming_it(name, value, fragment):
    """R5-A1: each bad value raises InvalidArgumentError from Trainer(...) itself (before
    fit, before any process group), and the message names the argument, the value seen and
    what is expected."""
    net = torch.nn.Linear(1, 1)
    args: dict[str, Any] = {
        "model": net,
        "optimizer": torch.optim.SGD(net.parameters(), lr=0.01),
        "loss_fn": MSE,
    }
    kw: dict[str, Any] = {}
    if name == "fsdp":
        kw["strategy"] = "fsdp"
    if name in args:
        args[name] = value
    else:
        kw[name] = value
    with pytest.raises(InvalidArgumentError) as info:
        devlayer.Trainer(args["model"], args["optimizer"], args["loss_fn"], **kw)
    message = str(info.value)
    assert f"{name}=" in message, message
    shown = ""
    if not callable(value) and not (isinstance(value, int) and value > 10**100):
        shown = repr(value)
    if name != "callbacks" and len(shown) < 40:
        assert shown in message, message
    assert fragment in message, message
    assert not devlayer.is_initialized()


def test_r5_a1_callbacks_accepts_any_iterable_of_callbacks_once():
    """R5-A1: ``callbacks`` may be any iterable of Callback instances (a generator too, read
    once); a non-Callback item is refused naming its position and type."""

    class Mark(Callback):
        pass

    marks = [Mark(), Mark()]
    assert toy_trainer(callbacks=(m for m in marks)).callbacks == marks
    with pytest.raises(InvalidArgumentError, match=r"callbacks\[1\] is a dict"):
        toy_trainer(callbacks=[Mark(), {}])


def test_r5_a1_good_values_are_kept():
    """R5-A1: the accepted forms still construct (paths as str or PathLike, seed 2**63-1,
    a positive float throughput, resume='auto' without a folder)."""
    from pathlib import Path

    t = toy_trainer(
        checkpoint_dir=Path("ck"),
        resume=os.path.join("ck", "step-000000004"),
        seed=2**63 - 1,
        reference_throughput=12.5,
        clip_grad=1,
        metrics_file="m.jsonl",
        fsdp={"min_params": 3},
        strategy="fsdp",
        num_workers="auto",
    )
    assert t.checkpoint_dir == Path("ck") and t.seed == 2**63 - 1
    assert toy_trainer(resume="auto").checkpoint_dir is None


def test_r5_a1_an_int_too_long_to_print_is_named_by_its_size():
    """R5-A1: seed=10**5000 (whose repr Python refuses: over 4300 digits) still gives the
    named error, with the int's size instead of its digits."""
    with pytest.raises(InvalidArgumentError, match=r"seed=an int of 16610 bits must be"):
        toy_trainer(seed=10**5000)


def test_r5_a2_resume_path_without_checkpoint_dir_is_refused():
    """R5-A2: ``resume=<checkpoint path>`` without ``checkpoint_dir`` used to train from
    scratch and report ``resumed_from None``; now it is refused at construction, naming the
    path and the folder to pass."""
    with pytest.raises(InvalidArgumentError) as info:
        toy_trainer(resume=os.path.join("x", "step-000000032"))
    message = str(info.value)
    assert "resume='x/step-000000032'" in message
    assert "checkpoint_dir=None" in message and "checkpoint_dir='x'" in message


def test_r5_a3_num_workers_is_bounded_by_the_cpus_of_the_rank():
    """R5-A3: the most DataLoader workers a rank may start is the CPUs it has for itself
    (``cpus_per_rank``) or else the CPUs it may use (affinity) divided among the local
    ranks, at least 1; 'auto' stays below."""
    assert max_num_workers(2, cpus=16) == 8
    assert max_num_workers(4, cpus=2) == 1
    assert max_num_workers(4, cpus_per_rank=8) == 8
    assert max_num_workers(1) == len(os.sched_getaffinity(0))


def test_a21_m1_max_num_workers_takes_the_cpus_per_rank_and_reads_no_launcher_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A21-M1: the CPUs of a rank reach the DataLoader bound as a number
    (``ProcessInfo.cpus_per_rank``, parsed by the launchers package), never from a launcher
    variable: a ``SLURM_CPUS_PER_TASK`` left in the environment changes neither the bound
    nor 'auto' nor the warning; ``cpus_per_rank`` is the rank's own, not divided."""
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "64")
    assert max_num_workers(1, cpus=2) == 2
    assert max_num_workers(4, cpus=8, cpus_per_rank=3) == 3
    assert auto_num_workers(4, cpus_per_rank=8) == 7
    assert auto_num_workers(4, cpus=32) == 7  # torchrun in one srun task: shared
    with pytest.warns(UserWarning, match="num_workers=4 is more than the 3 CPU"):
        assert check_num_workers(4, 2, cpus_per_rank=3) == 4


def test_r5_a3_prepare_loader_warns_above_the_cpus_and_refuses_above_the_limit(cpu):
    """R5-A3: prepare_loader (which the Trainer uses at fit) takes num_workers up to the
    rank's CPUs silently, warns above them (naming the value and the CPUs), and refuses more
    than 4 per CPU (at least 8) with the value, the limit and the fix, before any worker
    process exists."""
    from devlayer.train.data import MIN_WORKERS_LIMIT, WORKERS_PER_CPU

    cpus = max_num_workers(cpu.local_world_size)
    limit = max(MIN_WORKERS_LIMIT, WORKERS_PER_CPU * cpus)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert devlayer.prepare_loader(toy_data(), 8, num_workers=cpus).num_workers == cpus
    with pytest.warns(UserWarning, match=f"num_workers={cpus + 1} is more than the"):
        loader = devlayer.prepare_loader(toy_data(), 8, num_workers=cpus + 1)
    assert loader.num_workers == cpus + 1
    with pytest.warns(UserWarning):
        assert devlayer.prepare_loader(toy_data(), 8, num_workers=limit).num_workers == limit
    with pytest.raises(InvalidArgumentError) as info:
        devlayer.prepare_loader(toy_data(), 8, num_workers=limit + 1)
    message = str(info.value)
    assert f"num_workers={limit + 1}" in message and f"at most {limit} worker(s)" in message
    assert f"{cpus} CPU(s)" in message and "'auto'" in message
    with pytest.raises(InvalidArgumentError, match="num_workers=1000000 is more than 4"):
        devlayer.prepare_loader(toy_data(), 8, num_workers=10**6)


def test_r5_a4_optimizer_of_another_model_is_refused_at_fit(cpu):
    """R5-A4: an optimizer built on another model's parameters used to train 'fine' with
    bitwise unchanged weights; fit() now refuses it before the first step, naming how many
    of the model's trainable parameters the optimizer holds."""
    net, other = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    trainer = toy_trainer(net, torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(InvalidArgumentError) as info:
        trainer.fit(toy_data())
    message = str(info.value)
    assert "holds 0 of the model's 2 trainable parameters" in message
    assert "model.parameters()" in message
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert trainer.state.global_step == 0


def test_r5_a4_an_optimizer_over_part_of_the_model_trains(cpu):
    """R5-A4: an optimizer over a subset of the model's parameters (fine-tuning a head) is
    accepted and steps that subset."""
    net = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.Linear(4, 1))
    head = net[1].weight.detach().clone()
    trainer = toy_trainer(net, torch.optim.SGD(net[1].parameters(), lr=0.01))
    trainer.fit(toy_data())
    assert not torch.equal(head, net[1].weight.detach())


@pytest.mark.parametrize("n", [0])
def test_r5_a5_fit_on_an_empty_dataset_is_an_error(cpu, n):
    """R5-A5: fit() on a dataset with no samples used to return an empty history and train
    nothing; it now raises naming train_data and the 0 batches."""
    trainer = toy_trainer(max_epochs=3)
    with pytest.raises(InvalidArgumentError, match=r"train_data gives 0 batches per epoch"):
        trainer.fit(toy_data(n))
    assert trainer.state.history == []


@pytest.mark.parametrize(
    ("result", "shown"),
    [("loss", "a str"), (None, "None"), (torch.ones(2, requires_grad=True), "shape (2,)")],
    ids=["str", "none", "vector"],
)
def test_r5_a6_a_training_step_that_returns_no_loss_is_named(cpu, result, shown):
    """R5-A6: a training_step returning a str, None or a non-scalar tensor raises a named
    error at the first micro-batch instead of an AttributeError inside backward."""
    trainer = toy_trainer(loss_fn=None, training_step=lambda model, batch: result)
    with pytest.raises(InvalidArgumentError) as info:
        trainer.fit(toy_data())
    message = str(info.value)
    assert "training_step returned" in message and shown in message
    assert "one-element" in message


EARLY_BAD: list[tuple[dict[str, Any], str]] = [
    ({"monitor": None}, "monitor=None"),
    ({"monitor": ""}, "monitor=''"),
    ({"mode": "up"}, "mode='up'"),
    ({"patience": 0}, "patience=0"),
    ({"patience": "3"}, "patience='3'"),
    ({"patience": True}, "patience=True"),
    ({"min_delta": -1}, "min_delta=-1"),
    ({"min_delta": "0.1"}, "min_delta='0.1'"),
    ({"min_delta": float("nan")}, "min_delta=nan"),
    ({"target": "0.9"}, "target='0.9'"),
    ({"target": float("inf")}, "target=inf"),
    ({"min_delta": 10**400}, "min_delta=1000"),
]


@pytest.mark.parametrize(("kwargs", "shown"), EARLY_BAD, ids=[s for _, s in EARLY_BAD])
def test_r5_a7_early_stopping_arguments_are_checked(kwargs, shown):
    """R5-A7: EarlyStopping refuses a missing monitor, a negative or non-numeric min_delta,
    a non-int patience and a non-finite target, naming the argument and the value."""
    with pytest.raises(InvalidArgumentError, match=re.escape(f"EarlyStopping({shown}")):
        EarlyStopping(**kwargs)


def test_r5_a8_on_train_batch_end_sees_the_step_count_before_its_step(cpu):
    """R5-A8: as documented, on_train_batch_end runs before the optimizer step of its
    micro-batch: global_step counts the steps done before it, batches_done includes it."""
    seen: list[tuple[int, int]] = []

    class Record(Callback):
        def on_train_batch_end(self, trainer: Any, loss: Any) -> None:
            seen.append((trainer.state.global_step, trainer.state.batches_done))

    toy_trainer(callbacks=[Record()], grad_accum=2).fit(toy_data())  # 4 micro-batches of 4
    assert seen == [(0, 1), (0, 2), (1, 3), (1, 4)]
    assert "before the optimizer step" in (Callback.on_train_batch_end.__doc__ or "")


@pytest.mark.parametrize(
    ("result", "shown"),
    [("x", "a str"), ({"acc": "high"}, "'acc'"), ({"acc": torch.ones(3)}, "'acc'")],
    ids=["str", "str-value", "vector-value"],
)
def test_r5_a6_a_validation_step_that_returns_no_metrics_is_named(cpu, result, shown):
    """R5-A6: a validation_step must return a dict of per-batch numbers; a str, or a value
    that is not a number or one-element tensor, raises an error naming validation_step."""
    trainer = toy_trainer(validation_step=lambda model, batch: result)
    with pytest.raises(InvalidArgumentError) as info:
        trainer.fit(toy_data(), toy_data())
    message = str(info.value)
    assert "validation_step returned" in message and shown in message


def test_r5_a1_prepare_loader_refuses_a_batch_no_dataloader_can_slice(cpu):
    """R5-A1: prepare_loader(batch_size=10**30) is refused naming the value and the
    2**63-1 limit, instead of islice's ValueError at the first batch."""
    with pytest.raises(InvalidArgumentError, match=r"batch_size=10{30}.*2\*\*63-1"):
        devlayer.prepare_loader(toy_data(), 10**30, num_workers=0)
