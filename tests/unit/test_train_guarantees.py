"""Fast, single-process tests of Trainer guarantees that rested on one doctest or one slow
2-rank test (issue 20): early-stopping state in old checkpoints, the per-rank mean epoch
time, the sharded scaler's one decision for all ranks, optimizer rebinding under FSDP."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch.utils.data import TensorDataset

import devlayer
from devlayer.train import EarlyStopping
from tests.helpers import toy_trainer


@pytest.fixture
def cpu(clean_env: pytest.MonkeyPatch) -> Iterator[object]:
    with devlayer.init(backend="cpu") as st:
        yield st


def _data(n: int = 40) -> TensorDataset:
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    return TensorDataset(x, 2 * x)


def _fit(checkpoint_dir: object, stopper: EarlyStopping) -> tuple[devlayer.Trainer, list]:
    trainer = toy_trainer(
        lr=0.001,
        init_seed=0,
        max_epochs=10,
        early_stopping=stopper,
        checkpoint_dir=checkpoint_dir,
    )
    return trainer, trainer.fit(_data(), _data())


# ------------------------------------------------------------------ early stopping state


def _target_stop() -> EarlyStopping:
    """Stops after 2 epochs: every val_loss is under the target."""
    return EarlyStopping(monitor="val_loss", target=1e9, patience=2)


def test_r5_r3_an_old_checkpoint_without_monitor_and_mode_loads_and_its_stop_holds(
    cpu, tmp_path, monkeypatch, caplog
):
    """R5-R3: an EarlyStopping state saved before ``monitor``/``mode`` were kept
    (``{"best", "bad_epochs", "hits"}``) still loads, and the stop it records holds: the
    resumed run trains nothing, logs why and how to train on, and returns the saved
    history."""

    def old_state(self: EarlyStopping) -> dict[str, object]:
        return {"best": self.best, "bad_epochs": self.bad_epochs, "hits": self.hits}

    with monkeypatch.context() as old:
        old.setattr(EarlyStopping, "state_dict", old_state)
        first, history = _fit(tmp_path / "ckpt", _target_stop())
    assert first.stop_reason == "early_stopping" and len(history) == 2
    from devlayer.train.checkpoint import CheckpointStore

    payload, _ = CheckpointStore(tmp_path / "ckpt").load()
    assert set(payload["early_stopping"]) == {"best", "bad_epochs", "hits"}  # the old format
    again, resumed = _fit(tmp_path / "ckpt", _target_stop())
    assert again.resumed_from is not None
    assert again.stop_reason == "early_stopping" and again.stopped_early
    assert again.state.global_step == first.state.global_step and resumed == history
    assert "early stopping on val_loss ended the run resumed from" in caplog.text
    assert "nothing to train: pass a larger patience than 2" in caplog.text


def test_r5_r3_counters_of_another_metric_are_not_restored():
    """R5-R3: counters saved for another ``monitor`` or ``mode`` are not loaded (a best
    val_loss compared with val_accuracy would be silently wrong): a warning names both."""
    saved = EarlyStopping(monitor="val_loss", patience=1)
    saved.update({"val_loss": 1.0})
    saved.update({"val_loss": 2.0})
    assert saved.stopped
    for other in (EarlyStopping("val_accuracy", mode="max"), EarlyStopping("val_loss", "max")):
        with pytest.warns(UserWarning, match="watched 'val_loss' \\(mode='min'\\)"):
            other.load_state_dict(saved.state_dict())
        assert (other.best, other.bad_epochs, other.stopped) == (None, 0, False)
    same = EarlyStopping(monitor="val_loss", patience=1)
    same.load_state_dict(saved.state_dict())
    assert (same.best, same.bad_epochs, same.stopped) == (1.0, 1, True)


# ------------------------------------------------------------------ per-rank mean epoch time


def test_r5_r5_epoch_time_is_the_mean_of_the_ranks_training_times():
    """R5-R5: ``epoch_time`` is the mean of the ranks' training times (3 s and 5 s give
    4 s: not the sum, the slowest or rank 0's), and ``samples_per_sec`` is all ranks'
    samples over that mean; the scaling efficiency follows from it."""
    from devlayer.train.metrics import epoch_metrics

    sums = {"_train_loss": 96.0, "_train_count": 96.0, "_seconds": 3.0 + 5.0}
    m = epoch_metrics(sums, epoch=1, global_step=6, world_size=2, lr=0.1, reference_throughput=8.0)
    assert m["epoch_time"] == 4.0
    assert m["samples_per_sec"] == 24.0
    assert m["scaling_efficiency"] == 1.5  # 24 / (2 x 8)
    assert m["train_loss"] == 1.0 and "val_loss" not in m


# ------------------------------------------------------------------ ShardedGradScaler


@pytest.mark.parametrize(
    ("mine", "other"), [(False, True), (True, False), (False, False)], ids=["other", "mine", "none"]
)
def test_r5_r6_the_sharded_scaler_skips_when_any_rank_saw_an_inf(monkeypatch, mine, other):
    """R5-R6: the step is skipped (scale halved, weights kept) on this rank when ANY rank's
    gradient shard holds an inf, also when this rank's is finite: the decision is the
    all-reduced MAX of the ranks' flags (another rank simulated), never the local flag."""
    from devlayer.train.precision import ShardedGradScaler
    from devlayer.train.strategy import FSDPStrategy

    ops: list[str] = []

    def two_ranks(flag: torch.Tensor, op: str = "sum") -> torch.Tensor:
        ops.append(op)
        flags = [int(flag), int(other)]
        return torch.tensor({"max": max(flags), "min": min(flags), "sum": sum(flags)}[op])

    monkeypatch.setattr(devlayer.comm, "all_reduce", two_ranks)
    amp = FSDPStrategy().precision("16-mixed", torch.device("cpu"))
    assert isinstance(amp.scaler, ShardedGradScaler)
    scale = amp.scaler.get_scale()
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    for p in net.parameters():
        p.grad = torch.full_like(p, scale)
    if mine:
        net.weight.grad[0, 0] = float("inf")
    before = [p.detach().clone() for p in net.parameters()]
    amp.step(opt, net.parameters(), clip_grad=None)
    assert ops == ["max"]
    stepped = [not torch.equal(a, p) for a, p in zip(before, net.parameters(), strict=True)]
    if mine or other:
        assert stepped == [False, False] and amp.scaler.get_scale() == scale / 2
    else:
        assert stepped == [True, True] and amp.scaler.get_scale() == scale
        assert all(torch.equal(p.grad, torch.ones_like(p)) for p in net.parameters())


# ------------------------------------------------------------------ optimizer rebinding


@pytest.fixture
def one_rank_group() -> Iterator[None]:
    """A world-size-1 gloo process group in this process (FSDP2 shards over it)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_r5_r7_rebind_points_each_group_at_the_shards_of_the_same_names(one_rank_group):
    """R5-R7: after ``fully_shard`` swaps every parameter for a DTensor, the optimizer built
    before it is pointed at the new parameters by name (groups listed in another order than
    the model's, each group's options kept), and its step then moves the sharded weights.
    Not rebound, it would step the old tensors and leave the model untouched."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from devlayer.train.fsdp import parameter_names, rebind_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(
        [
            {"params": model[1].parameters(), "lr": 0.1},
            {"params": model[0].parameters(), "lr": 0.2, "weight_decay": 0.01},
        ]
    )
    names = parameter_names(model)
    mesh = init_device_mesh("cpu", (1,))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    current = dict(model.named_parameters())
    assert type(current["0.weight"]).__name__ == "DTensor"
    rebind_optimizer(opt, names, model)
    groups = [
        [n for p in g["params"] for n, q in current.items() if q is p] for g in opt.param_groups
    ]
    assert groups == [["1.weight", "1.bias"], ["0.weight", "0.bias"]]
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(0.1, 0), (0.2, 0.01)]
    before = {n: p.detach().full_tensor().clone() for n, p in current.items()}
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    assert all(not torch.equal(before[n], p.detach().full_tensor()) for n, p in current.items())
