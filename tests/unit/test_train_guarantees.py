"""Fast, single-process tests of Trainer guarantees (issue 20): early-stopping state in old
checkpoints."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch.utils.data import TensorDataset

import devlayer
from devlayer.train import EarlyStopping


@pytest.fixture
def cpu(clean_env: pytest.MonkeyPatch) -> Iterator[object]:
    with devlayer.init(backend="cpu") as st:
        yield st


def _data(n: int = 40) -> TensorDataset:
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    return TensorDataset(x, 2 * x)


def _fit(checkpoint_dir: object, stopper: EarlyStopping) -> tuple[devlayer.Trainer, list]:
    torch.manual_seed(0)
    net = torch.nn.Linear(1, 1)
    trainer = devlayer.Trainer(
        net,
        torch.optim.SGD(net.parameters(), lr=0.001),
        torch.nn.functional.mse_loss,
        batch_size=8,
        max_epochs=10,
        early_stopping=stopper,
        checkpoint_dir=checkpoint_dir,
        progress=False,
        num_workers=0,
    )
    return trainer, trainer.fit(_data(), _data())


# ------------------------------------------------------------------ early stopping state


def _target_stop() -> EarlyStopping:
    """Stops after 2 epochs: every val_loss is under the target."""
    return EarlyStopping(monitor="val_loss", target=1e9, patience=2)


def test_r5_r3_an_old_checkpoint_without_monitor_and_mode_loads_and_its_stop_holds(
    cpu, tmp_path, monkeypatch
):
    """R5-R3: an EarlyStopping state saved before ``monitor``/``mode`` were kept
    (``{"best", "bad_epochs", "hits"}``) still loads, and the stop it records holds: the
    resumed run trains nothing and returns the saved history."""

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
