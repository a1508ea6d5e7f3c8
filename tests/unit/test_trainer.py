"""The training layer at world size 1 (fast, in-process): loader, precision, options."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import devlayer
from devlayer.train.data import auto_num_workers
from devlayer.train.trainer import EarlyStopping, resolve_precision
from tests.helpers import toy_trainer


@pytest.fixture
def cpu(clean_env):
    with devlayer.init(backend="cpu") as st:
        yield st


def _data(n: int = 40) -> TensorDataset:
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    return TensorDataset(x, 2 * x)


def test_prepare_loader_splits_global_batch_and_reshuffles_each_epoch(cpu):
    loader = devlayer.prepare_loader(_data(), 8, num_workers=0, seed=3)
    first = torch.cat([b[0] for b in loader]).flatten().tolist()
    second = torch.cat([b[0] for b in loader]).flatten().tolist()
    assert loader.batch_size == 8 and len(loader) == 5
    assert sorted(first) == sorted(second) == list(map(float, range(40)))
    assert first != second, "set_epoch must run automatically: epoch 2 is shuffled anew"
    again = devlayer.prepare_loader(_data(), 8, num_workers=0, seed=3)
    assert torch.cat([b[0] for b in again]).flatten().tolist() == first  # same seed, same order


def test_prepare_loader_resumes_mid_epoch(cpu):
    loader = devlayer.prepare_loader(_data(), 8, num_workers=0)
    full = [b[0].flatten().tolist() for b in loader]
    loader.set_epoch(0)
    loader.skip_batches(2)
    assert [b[0].flatten().tolist() for b in loader] == full[2:]


def test_prepare_loader_rejects_indivisible_global_batch(clean_env):
    with devlayer.init(backend="cpu"):
        devlayer.prepare_loader(_data(), 7, num_workers=0)  # world 1 divides anything
    clean_env.setenv("DEVLAYER_LAUNCHER", "none")
    import devlayer.train.data as data_mod

    class _Two:
        world_size, rank, local_world_size = 2, 0, 1
        device = torch.device("cpu")

    clean_env.setattr(devlayer, "state", lambda: _Two())
    clean_env.setattr(devlayer, "is_initialized", lambda: True)
    with pytest.raises(devlayer.errors.InvalidArgumentError) as info:
        data_mod.prepare_loader(_data(), 7, num_workers=0)
    assert "batch_size=7" in str(info.value) and "world_size=2" in str(info.value)
    assert "per_rank=True" in str(info.value)


def test_prepare_loader_reshards_an_existing_dataloader(cpu):
    source = DataLoader(_data(), batch_size=10, shuffle=False)
    loader = devlayer.prepare_loader(source, num_workers=0)
    assert loader.batch_size == 10 and loader.global_batch_size == 10
    assert [b[0].flatten()[0].item() for b in loader] == [0.0, 10.0, 20.0, 30.0]


def test_auto_num_workers_respects_cpus_per_rank_and_affinity():
    assert auto_num_workers(2, cpus=16) == 7
    assert auto_num_workers(4, cpus_per_rank=8) == 7  # srun: each rank its own task
    assert auto_num_workers(4, cpus=32) == 7  # torchrun in one srun task: shared
    assert auto_num_workers(2, cpus=2) == 0


def test_prepare_model_at_world_one_returns_the_module(cpu):
    net = torch.nn.Linear(2, 2)
    assert devlayer.prepare_model(net) is net
    with pytest.raises(devlayer.errors.InvalidArgumentError, match=r"torch\.nn\.Module"):
        devlayer.prepare_model("not a model")


def test_resolve_precision_names_and_env():
    assert resolve_precision("32") == "32" and resolve_precision("bf16") == "bf16-mixed"
    assert resolve_precision(None, {"ACCELERATE_MIXED_PRECISION": "bf16"}) == "bf16-mixed"
    assert resolve_precision(None, {}) == "32"
    with pytest.raises(devlayer.errors.InvalidArgumentError, match="'fp8'"):
        resolve_precision("fp8")


def _fit(**kw):
    trainer = toy_trainer(lr=0.001, init_seed=0, **kw)
    return trainer, trainer.fit(_data(), _data())


def test_bf16_mixed_trains_on_cpu(cpu):
    _, history = _fit(precision="bf16-mixed", max_epochs=2)
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_lr_scaling_is_a_no_op_at_world_one(cpu, caplog):
    trainer, _ = _fit(lr_scaling="sqrt", max_epochs=1)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.001)  # sqrt(1) = 1
    assert "lr_scaling" not in caplog.text  # nothing to report over one rank


def test_resume_rescales_lr_saved_under_another_world_size(cpu, tmp_path):
    trainer, _ = _fit(lr_scaling="linear", max_epochs=1, checkpoint_dir=tmp_path)
    # As if saved on 2 ranks: the rates carry lr_scaling's x2 (save_checkpoint rewrites
    # the run's last step, whose folder lock fit() released).
    trainer.optimizer.param_groups[0]["lr"] = 0.002
    trainer.lr_scale.factor = 2.0
    trainer.save_checkpoint()
    resumed, _ = _fit(lr_scaling="linear", max_epochs=1, checkpoint_dir=tmp_path)
    assert resumed.resumed_from is not None
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.001)


def test_early_stopping_with_target_and_patience(cpu):
    stopper = EarlyStopping(monitor="val_loss", mode="min", target=1e9, patience=2)
    trainer, history = _fit(max_epochs=10, early_stopping=stopper)
    assert len(history) == 2 and trainer.stopped_early


def test_early_stopping_counts_epochs_without_improvement():
    stop = EarlyStopping(monitor="m", mode="max", patience=2)
    assert [stop.update({"m": v}) for v in (1.0, 2.0, 1.5, 1.9)] == [False, False, False, True]
    with pytest.raises(devlayer.errors.InvalidArgumentError, match="'m'"):
        EarlyStopping(monitor="m").update({"other": 1.0})


def test_metrics_file_and_history(cpu, tmp_path):
    path = tmp_path / "m.jsonl"
    _, history = _fit(max_epochs=3, metrics_file=path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["train_loss"] == pytest.approx(history[-1]["train_loss"])
    assert {"val_loss", "samples_per_sec", "epoch_time", "global_step"} <= set(rows[0])


def test_accuracy_reported_for_classification(cpu, make_trainer):
    x = torch.randn(32, 3)
    y = (x[:, 0] > 0).long()
    net = torch.nn.Linear(3, 2)
    trainer = make_trainer(net, loss_fn=torch.nn.functional.cross_entropy, lr=0.5, max_epochs=3)
    history = trainer.fit(TensorDataset(x, y), TensorDataset(x, y))
    assert 0.0 <= history[-1]["val_accuracy"] <= 1.0
    assert history[-1]["val_accuracy"] > 0.7


def test_bad_trainer_arguments_are_named():
    net = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(devlayer.errors.InvalidArgumentError, match="grad_accum=0"):
        devlayer.Trainer(net, opt, torch.nn.functional.mse_loss, grad_accum=0)
    with pytest.raises(devlayer.errors.InvalidArgumentError, match="loss_fn"):
        devlayer.Trainer(net, opt)
    with pytest.raises(devlayer.errors.InvalidArgumentError, match="lr_scaling='cubic'"):
        devlayer.Trainer(net, opt, torch.nn.functional.mse_loss, lr_scaling="cubic")


def test_batch_size_must_split_into_micro_batches(cpu, make_trainer):
    trainer = make_trainer(lr=0.1, batch_size=9, grad_accum=2)
    with pytest.raises(devlayer.errors.InvalidArgumentError, match="batch_size=9"):
        trainer.fit(_data())


def test_fp16_mixed_uses_a_grad_scaler(cpu):
    trainer, history = _fit(precision="16-mixed", max_epochs=2)
    assert trainer.scaler is not None and trainer.scaler.get_scale() > 0
    assert all(h["train_loss"] == h["train_loss"] for h in history)  # no NaN


def test_checkpoint_dir_alone_saves_the_finished_run(cpu, tmp_path):
    from devlayer.train.checkpoint import CheckpointStore

    _, history = _fit(max_epochs=2, checkpoint_dir=tmp_path)
    store = CheckpointStore(tmp_path)
    assert [p.name for p in store.list()] == [f"step-{history[-1]['global_step']:09d}"]
    payload, manifest = store.load()
    assert manifest["epoch"] == 2 and payload["batches_done"] == 0


def test_exact_shards_for_evaluation_have_no_repeats():
    from devlayer.train.data import _ExactShard

    shards = [list(_ExactShard(7, 2, r, shuffle=True, seed=1)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(7))  # every sample once, none twice
    assert [len(_ExactShard(7, 2, r, False, 0)) for r in range(2)] == [4, 3]


@pytest.fixture
def foreign_default_device():
    """torch's default device set to something other than the CPU, as init() does on GPUs.

    ``meta`` stands in for cuda/xpu: the DataLoader's CPU-generator seed draw and default
    collate fail on it exactly as they do on an accelerator default device.
    """
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


@pytest.mark.parametrize("shuffle", [True, False])
def test_loaders_iterate_on_cpu_under_an_accelerator_default_device(
    cpu, foreign_default_device, shuffle
):
    # Labels are Python ints: default collate builds them with torch.tensor (a factory).
    data = [(torch.tensor([float(i)], device="cpu"), i) for i in range(12)]
    loader = devlayer.prepare_loader(data, 4, num_workers=0, seed=1, shuffle=shuffle)
    batches = list(loader)
    assert len(batches) == 3
    assert all(x.device.type == "cpu" and y.device.type == "cpu" for x, y in batches)
    assert sorted(int(v) for _, y in batches for v in y) == list(range(12))
    assert torch.empty(1).device.type == "meta"  # the default is untouched afterwards
    shard = devlayer.prepare_loader(data, 4, num_workers=0, shuffle=shuffle, pad=False)
    assert sorted(int(v) for _, y in shard for v in y) == list(range(12))


def test_max_steps_with_no_batches_is_an_error_not_a_hang(cpu, make_trainer):
    trainer = make_trainer(lr=0.1, max_steps=5)
    with pytest.raises(devlayer.errors.InvalidArgumentError, match=r"0 batches.*max_steps=5"):
        trainer.fit(_data(0))


def test_bounds_default_and_validation():
    net = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    mse = torch.nn.functional.mse_loss
    assert devlayer.Trainer(net, opt, mse).max_epochs == 1
    only_steps = devlayer.Trainer(net, opt, mse, max_steps=50)
    assert only_steps.max_epochs is None and only_steps.max_steps == 50
    with pytest.raises(devlayer.errors.InvalidArgumentError, match="max_epochs=0"):
        devlayer.Trainer(net, opt, mse, max_epochs=0)
    with pytest.raises(devlayer.errors.InvalidArgumentError, match="max_steps=0"):
        devlayer.Trainer(net, opt, mse, max_steps=0)


def test_early_stopping_is_named_as_the_stop_reason(cpu, capsys, make_trainer):
    stopper = EarlyStopping(monitor="val_loss", mode="min", target=1e9, patience=2)
    trainer = make_trainer(
        lr=0.001, max_epochs=10, max_steps=1000, early_stopping=stopper, progress=True
    )
    history = trainer.fit(_data(), _data())
    assert trainer.stop_reason == "early_stopping" and history[-1]["stopped_by"] == "early_stopping"
    assert capsys.readouterr().out.splitlines()[-1] == (
        "stopped: early stopping on val_loss at step 10, epoch 2; max_steps=1000 not reached; "
        "max_epochs=10 not reached"
    )
