"""Trainer(loggers=...) on two real gloo ranks: rank 0 alone writes; a resume at another
world size continues the same tracker runs (issue 26, item 1)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch

import devlayer
from devlayer.train.loggers import Logger, LoggerRun
from tests.dist.trainer_worker import make_data, make_model

pytestmark = [pytest.mark.dist, pytest.mark.timeout(400)]


class RankFiles(Logger):
    """Appends every call it gets to ``<folder>/calls-rank<R>.txt``, R being the calling rank."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def _write(self, text: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / f"calls-rank{devlayer.rank()}.txt").open("a") as fh:
            fh.write(text + "\n")

    def open(self, run: LoggerRun) -> None:
        self._write(f"open resumed={run.resumed} step={run.step}")

    def log_hparams(self, params: Any) -> None:
        self._write(f"hparams world_size={params['world_size']}")

    def log_metrics(self, metrics: Any, step: int) -> None:
        self._write(f"metrics {step}")

    def log_event(self, name: str, data: Any, step: int) -> None:
        self._write(f"event {name} {step} {data['old_world_size']}->{data['new_world_size']}")

    def close(self) -> None:
        self._write("close")


def fit_with_loggers(
    folder: str, names: list[str], max_epochs: int, *, allow: bool = False
) -> dict[str, Any]:
    """Fit the small regression with ``names`` + a RankFiles logger, checkpoints in folder."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    trainer = devlayer.Trainer(
        model,
        opt,
        torch.nn.functional.mse_loss,
        batch_size=16,
        max_epochs=max_epochs,
        checkpoint_dir=folder,
        loggers=["jsonl", *names, RankFiles(folder)],
        allow_world_size_change=allow,
        progress=False,
        num_workers=0,
    )
    history = trainer.fit(make_data(64), make_data(32, seed=1))
    return {"rank": devlayer.rank(), "history": history}


def _two_ranks_then_one(ckpt: Path, names: list[str]) -> list[dict[str, Any]]:
    """Two epochs on 2 ranks, then a resume to 4 epochs on 1 rank; the JSONL epoch entries
    (the file also holds the world-size change at step 8: L27-2)."""
    results = devlayer.spawn(
        partial(fit_with_loggers, str(ckpt), names, 2),
        nprocs=2,
        backend="cpu",
        timeout=60,
        join_timeout=300,
    )
    assert [r["rank"] for r in results] == [0, 1]
    with devlayer.init(backend="cpu"):
        fit_with_loggers(str(ckpt), names, 4, allow=True)
    every = [json.loads(x) for x in (ckpt / "metrics.jsonl").read_text().splitlines()]
    events = [(e["event"], e["global_step"]) for e in every if "event" in e]
    assert events == [("world_size_change", 8)]
    lines = [e for e in every if "event" not in e]
    assert [(e["global_step"], e["world_size"]) for e in lines] == [
        (4, 2),
        (8, 2),
        (12, 1),
        (16, 1),
    ]
    return lines


def test_g26_8_rank_zero_alone_writes_and_a_world_size_change_continues(clean_env, tmp_path):
    """G26-8: on 2 spawned ranks only rank 0 opens, feeds and closes the loggers (rank 1
    never calls one); resumed at world size 1, the same TensorBoard folder goes on at the
    JSONL file's steps and the hyperparameters are not recorded again. L27-2: the resume
    sends the world-size change (2 -> 1 at step 8) to every logger once, after opening
    them: the JSONL file, TensorBoard (a text entry at step 8) and the user's logger."""
    from tests.unit.test_loggers import _tb_hparams, _tb_run, _tb_scalars, _tb_texts

    ckpt = tmp_path / "ckpt"
    lines = _two_ranks_then_one(ckpt, ["tensorboard"])
    assert not (ckpt / "calls-rank1.txt").exists(), "rank 1 called a logger"
    assert (ckpt / "calls-rank0.txt").read_text().splitlines() == [
        "open resumed=False step=0",
        "hparams world_size=2",
        "metrics 4",
        "metrics 8",
        "close",
        "open resumed=True step=8",
        "event world_size_change 8 2->1",
        "metrics 12",
        "metrics 16",
        "close",
    ]
    run = _tb_run(ckpt / "tensorboard")
    scalars = _tb_scalars(run)["train_loss"]
    assert [s for s, _ in scalars] == [e["global_step"] for e in lines]
    assert [v for _, v in scalars] == pytest.approx([e["train_loss"] for e in lines])
    (hparams,) = _tb_hparams(run)
    assert hparams["world_size"] == 2
    ((step, text),) = _tb_texts(run)["events/world_size_change/text_summary"]
    assert step == 8 and '"old_world_size": 2' in text and '"new_world_size": 1' in text


@pytest.mark.trackers
def test_g26_8_mlflow_run_continues_across_a_world_size_change(clean_env, tmp_path):
    """G26-8: the MLflow run rank 0 started on 2 ranks is the one a 1-rank resume continues:
    one run, its metric history = the JSONL file's, its parameters from the first start.
    L27-2: the run holds the world-size change as its one event artifact, at step 8."""
    from tests.unit.test_loggers import _mlflow, _mlflow_history

    ckpt = tmp_path / "ckpt"
    lines = _two_ranks_then_one(ckpt, ["mlflow"])
    client, runs = _mlflow(ckpt)
    assert len(runs) == 1, [r.info.run_id for r in runs]
    got = _mlflow_history(client, runs[0].info.run_id, "train_loss")
    assert [s for s, _ in got] == [e["global_step"] for e in lines]
    assert [v for _, v in got] == pytest.approx([e["train_loss"] for e in lines])
    assert runs[0].data.params["world_size"] == "2"
    events = [f.path for f in client.list_artifacts(runs[0].info.run_id, "events")]
    assert events == ["events/00000008-world_size_change.json"]
