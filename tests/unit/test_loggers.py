"""Trainer(loggers=...): TensorBoard, MLflow, JSONL and a user's own logger (issue 26, item 1).

Everything is read back with the trackers' own readers: TensorBoard's ``EventAccumulator``
and MLflow's ``MlflowClient``; the steps and values must equal the JSONL file's.
"""

from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import devlayer
from devlayer.errors import InvalidArgumentError
from devlayer.train.errors import LoggerError, LoggerExtraMissingError, LoggerWarning
from devlayer.train.loggers import (
    JsonlLogger,
    Logger,
    LoggerRun,
    Loggers,
    MLflowLogger,
    TensorBoardLogger,
)
from tests.dist.trainer_worker import make_data, make_model

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(300)


def _trainer(**kwargs: Any) -> devlayer.Trainer:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    options: dict[str, Any] = {
        "batch_size": 16,
        "max_epochs": 2,
        "progress": False,
        "num_workers": 0,
        **kwargs,
    }
    return devlayer.Trainer(model, opt, torch.nn.functional.mse_loss, **options)


def _fit(**kwargs: Any) -> list[dict[str, Any]]:
    try:
        return _trainer(**kwargs).fit(make_data(64), make_data(32, seed=1))
    finally:
        devlayer.shutdown()


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _numbers(entry: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in entry.items()
        if k != "global_step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _tb_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in ``folder``: tag -> [(step, value)], by step (the reader goes through
    the event files in name order, and a resumed run's file can sort first: the name starts
    with whole seconds, then the pid; a stable sort keeps a repeated step visible)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {
        tag: sorted(((e.step, e.value) for e in acc.Scalars(tag)), key=lambda sv: sv[0])
        for tag in acc.Tags()["scalars"]
    }


def _tb_run(folder: Path) -> Path:
    """The one run folder under ``<run folder>/tensorboard``."""
    (run,) = [p for p in folder.iterdir() if p.is_dir()]
    return run


def _tb_hparams(folder: Path) -> list[dict[str, Any]]:
    """Every hparams session record in every event file of ``folder`` (not just the last)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    found = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == "_hparams_/session_start_info":
                    data = plugin_data_pb2.HParamsPluginData.FromString(
                        value.metadata.plugin_data.content
                    )
                    hp = data.session_start_info.hparams
                    found.append({k: hp[k].WhichOneof("kind") and _value(hp[k]) for k in hp})
    return found


def _value(v: Any) -> Any:
    return getattr(v, v.WhichOneof("kind"))


def _mlflow(folder: Path) -> tuple[Any, list[Any]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{folder.absolute().as_posix()}/mlflow.db")
    exp = client.get_experiment_by_name("devlayer")
    assert exp is not None, "the experiment was not created"
    return client, client.search_runs([exp.experiment_id])


def _mlflow_history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_g26_1_tensorboard_holds_the_jsonl_numbers_at_the_same_steps(clean_env, tmp_path):
    """G26-1: loggers=["tensorboard"] writes event files under the run's folder (metrics_file's
    folder) that TensorBoard's own reader reads back: every number of every JSONL entry at the
    entry's global_step, and the hyperparameters once, in the HParams records."""
    metrics = tmp_path / "run" / "metrics.jsonl"
    history = _fit(metrics_file=metrics, loggers=["tensorboard"])
    lines = _jsonl(metrics)
    assert lines == json.loads(json.dumps(history)) and len(lines) == 2
    scalars = _tb_scalars(_tb_run(tmp_path / "run" / "tensorboard"))
    expected: dict[str, list[tuple[int, float]]] = {}
    for entry in lines:
        for key, value in _numbers(entry).items():
            expected.setdefault(key, []).append((entry["global_step"], value))
    assert set(scalars) == set(expected) >= {"train_loss", "val_loss", "epoch", "lr"}
    for key, points in expected.items():
        assert [s for s, _ in scalars[key]] == [s for s, _ in points], key
        assert [v for _, v in scalars[key]] == pytest.approx([v for _, v in points], rel=1e-6)
    (hparams,) = _tb_hparams(_tb_run(tmp_path / "run" / "tensorboard"))
    assert hparams["batch_size"] == 16 and hparams["optimizer"] == "SGD"
    assert hparams["lr"] == pytest.approx(0.05) and hparams["strategy"] == "ddp"


@pytest.mark.trackers
def test_g26_2_mlflow_holds_the_jsonl_numbers_and_the_hyperparameters(clean_env, tmp_path):
    """G26-2: loggers=["mlflow"] writes, without a server, one MLflow run into the run's
    folder (sqlite:///<folder>/mlflow.db, MLflow 3's default kind of store): MLflow's client
    reads back every JSONL number at its global_step, the hyperparameters as parameters,
    and the run finished."""
    metrics = tmp_path / "metrics.jsonl"
    _fit(metrics_file=metrics, loggers=["mlflow"])
    lines = _jsonl(metrics)
    client, runs = _mlflow(tmp_path)
    (run,) = runs
    assert run.info.status == "FINISHED"
    for key in _numbers(lines[0]):
        expected = [(e["global_step"], _numbers(e)[key]) for e in lines]
        got = _mlflow_history(client, run.info.run_id, key)
        assert [s for s, _ in got] == [s for s, _ in expected], key
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6), key
    params = run.data.params
    assert params["batch_size"] == "16" and params["max_epochs"] == "2"
    assert params["optimizer"] == "SGD" and params["world_size"] == "1"


def _fit_twice(ckpt: Path, loggers: list[str]) -> list[dict[str, Any]]:
    """Two epochs, then a resumed fit() to four; returns the JSONL entries (steps 4..16)."""
    _fit(checkpoint_dir=ckpt, loggers=["jsonl", *loggers], max_epochs=2)
    _fit(checkpoint_dir=ckpt, loggers=["jsonl", *loggers], max_epochs=4)
    lines = _jsonl(ckpt / "metrics.jsonl")
    assert [e["global_step"] for e in lines] == [4, 8, 12, 16]
    return lines


@pytest.mark.slow
def test_g26_3_a_resume_continues_the_tensorboard_run(clean_env, tmp_path):
    """G26-3: a resumed fit() (resume="auto" from checkpoint_dir, the run's folder) goes on
    in the same TensorBoard folder: every step once, in order, the values of the JSONL file,
    and the hyperparameters recorded once over all event files."""
    ckpt = tmp_path / "ckpt"
    lines = _fit_twice(ckpt, ["tensorboard"])
    run = _tb_run(ckpt / "tensorboard")
    scalars = _tb_scalars(run)["train_loss"]
    assert [s for s, _ in scalars] == [e["global_step"] for e in lines]
    assert [v for _, v in scalars] == pytest.approx([e["train_loss"] for e in lines])
    assert len(_tb_hparams(run)) == 1
    assert len(list(run.glob("events.out.tfevents.*"))) == 2


def test_g26_1_each_fresh_run_gets_its_own_tensorboard_folder(clean_env, tmp_path):
    """G26-1: two fresh runs sharing a run folder (metrics_file alone, no checkpoints) are
    two TensorBoard runs (two folders under tensorboard/), never one run whose steps start
    over; TensorBoardLogger(log_dir=...) writes where it is told."""
    metrics = tmp_path / "metrics.jsonl"
    _fit(metrics_file=metrics, loggers=["tensorboard"])
    _fit(metrics_file=metrics, loggers=["tensorboard"])
    runs = sorted(p for p in (tmp_path / "tensorboard").iterdir() if p.is_dir())
    assert len(runs) == 2, runs
    for run in runs:
        assert [s for s, _ in _tb_scalars(run)["train_loss"]] == [4, 8]
    mine = TensorBoardLogger(log_dir=tmp_path / "mine")
    _fit(metrics_file=metrics, loggers=[mine], max_epochs=1)
    assert [s for s, _ in _tb_scalars(tmp_path / "mine")["train_loss"]] == [4]


@pytest.mark.slow
@pytest.mark.trackers
def test_g26_3_a_resume_continues_the_mlflow_run(clean_env, tmp_path):
    """G26-3: a resumed fit() reopens the MLflow run tagged with the checkpoint run's id: one
    run, its metric history = the JSONL file's, its parameters logged once, finished."""
    ckpt = tmp_path / "ckpt"
    lines = _fit_twice(ckpt, ["mlflow"])
    client, runs = _mlflow(ckpt)
    assert len(runs) == 1, [r.info.run_id for r in runs]
    got = _mlflow_history(client, runs[0].info.run_id, "train_loss")
    assert [s for s, _ in got] == [e["global_step"] for e in lines]
    assert [v for _, v in got] == pytest.approx([e["train_loss"] for e in lines])
    assert runs[0].info.status == "FINISHED"
    assert len(runs[0].data.params) == 13
    assert runs[0].data.tags["devlayer.run_id"]


def test_g26_4_a_missing_extra_is_refused_when_the_trainer_is_built(clean_env, monkeypatch):
    """G26-4: a named tracker whose package is missing raises LoggerExtraMissingError (a
    DevlayerError) at Trainer construction, naming the extra to install; so does building
    the logger object."""
    for module, name in (("tensorboard", "tensorboard"), ("mlflow", "mlflow")):
        monkeypatch.setitem(sys.modules, module, None)  # find_spec answers "not installed"
        with pytest.raises(LoggerExtraMissingError) as info:
            _trainer(loggers=[name], metrics_file="m.jsonl")
        assert f"pip install 'devlayer[{name}]'" in str(info.value)
        assert isinstance(info.value, devlayer.errors.DevlayerError)
        with pytest.raises(LoggerExtraMissingError):
            (TensorBoardLogger if name == "tensorboard" else MLflowLogger)()


@pytest.mark.parametrize(
    ("loggers", "extra", "message"),
    [
        ("tensorboard", {}, "must be a list (or tuple) of logger names"),
        (iter(["jsonl"]), {}, "must be a list (or tuple)"),
        (["wandb"], {}, "loggers[0]='wandb' is not a logger; use one of jsonl, tensorboard"),
        (["jsonl", "jsonl"], {"metrics_file": "m.jsonl"}, "names 'jsonl' twice"),
        ([print], {}, "is not a logger"),
        (["tensorboard"], {}, "neither metrics_file nor checkpoint_dir"),
        (["jsonl"], {}, "neither metrics_file nor checkpoint_dir"),
    ],
)
def test_g26_5_bad_loggers_are_refused_at_construction(clean_env, loggers, extra, message):
    """G26-5: a loggers= value that cannot work (not a list, an unknown name, a name twice,
    a tracker with no run folder) is refused when the Trainer is built, by name."""
    with pytest.raises(InvalidArgumentError) as info:
        _trainer(loggers=loggers, **extra)
    assert message in str(info.value)


@pytest.mark.trackers
def test_g26_2_mlflow_without_a_folder_uses_its_tracking_uri(clean_env, tmp_path):
    """G26-2: MLFLOW_TRACKING_URI (or tracking_uri=) is where MLflow writes: no run folder
    is needed then."""
    clean_env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/elsewhere.db")
    _fit(loggers=["mlflow"], max_epochs=1)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/elsewhere.db")
    exp = client.get_experiment_by_name("devlayer")
    assert exp is not None and len(client.search_runs([exp.experiment_id])) == 1


def _doc_logger() -> type[Logger]:
    """The ``CsvLogger`` class shown in docs/training.md, run as written there."""
    text = (ROOT / "docs" / "training.md").read_text()
    (code,) = re.findall(r"```python\n(from devlayer\.train\.loggers import.*?)```", text, re.S)
    namespace: dict[str, Any] = {}
    exec(compile(code, "docs/training.md", "exec"), namespace)
    return namespace["CsvLogger"]


def test_g26_6_the_documented_logger_receives_the_jsonl_entries(clean_env, tmp_path):
    """G26-6: the user logger of docs/training.md ("A logger of your own"), passed beside
    metrics_file, gets every epoch once with the JSONL entry's step and numbers."""
    csv_logger = _doc_logger()
    metrics = tmp_path / "metrics.jsonl"
    _fit(metrics_file=metrics, loggers=[csv_logger(tmp_path / "m.csv")], max_epochs=3)
    rows = [line.split(",") for line in (tmp_path / "m.csv").read_text().splitlines()]
    lines = _jsonl(metrics)
    assert [int(r[0]) for r in rows] == [e["global_step"] for e in lines]
    for row, entry in zip(rows, lines, strict=True):
        got = {k: float(v) for k, v in (cell.split("=") for cell in row[1:])}
        assert got == pytest.approx(_numbers(entry), rel=1e-5)


class _Recorder(Logger):
    def __init__(self, fail_at: int | None = None) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail_at = fail_at

    def open(self, run: LoggerRun) -> None:
        self.calls.append(("open", run.resumed))

    def log_hparams(self, params: Any) -> None:
        self.calls.append(("hparams", dict(params)))

    def log_metrics(self, metrics: Any, step: int) -> None:
        if step == self.fail_at:
            raise OSError("disk full")
        self.calls.append(("metrics", step))

    def close(self) -> None:
        self.calls.append(("close", None))


def test_g26_7_a_logger_that_fails_is_dropped_with_a_warning(clean_env, tmp_path):
    """G26-7: a logger raising in log_metrics is dropped with a LoggerWarning naming it and
    the error; training finishes and the other loggers get every epoch."""
    bad, good = _Recorder(fail_at=8), _Recorder()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = _fit(loggers=[bad, good], max_epochs=3)
    assert len(history) == 3
    found = [w for w in caught if issubclass(w.category, LoggerWarning)]
    assert len(found) == 1 and "disk full" in str(found[0].message)
    assert "step 8" in str(found[0].message)
    assert [c for c in bad.calls if c[0] == "metrics"] == [("metrics", 4)]
    assert [c[1] for c in good.calls if c[0] == "metrics"] == [4, 8, 12]
    assert good.calls[0] == ("open", False) and good.calls[1][0] == "hparams"
    assert good.calls[-1] == ("close", None) and ("close", None) not in bad.calls


def test_g26_7_a_logger_that_cannot_open_fails_fit(clean_env, tmp_path):
    """G26-7: a logger that cannot be opened fails fit() with LoggerError naming it and
    the cause, and the loggers opened before it are closed."""

    class Broken(_Recorder):
        def open(self, run: LoggerRun) -> None:
            raise PermissionError("read-only folder")

    first = _Recorder()
    with pytest.raises(LoggerError, match="could not be opened: PermissionError: read-only"):
        _fit(loggers=[first, Broken()], max_epochs=1)
    assert first.calls[-1] == ("close", None)


def test_metrics_file_alone_still_writes_the_jsonl_file(clean_env, tmp_path):
    """metrics_file without loggers= writes the JSONL file as before (an implied "jsonl")."""
    group = Loggers.build((), metrics_file=tmp_path / "m.jsonl", checkpoint_dir=None)
    assert [type(x).__name__ for x in group.items] == ["JsonlLogger"]
    history = _fit(metrics_file=tmp_path / "m.jsonl")
    assert _jsonl(tmp_path / "m.jsonl") == json.loads(json.dumps(history))


def _tb_texts(folder: Path) -> dict[str, list[tuple[int, str]]]:
    """Every text entry TensorBoard's reader finds in ``folder``: tag -> [(step, text)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    acc.Reload()
    return {
        tag: sorted(
            ((e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)),
            key=lambda st: st[0],
        )
        for tag in acc.Tags()["tensors"]
    }


def _a_world_change() -> Any:
    from devlayer.train.elastic import BatchPlan, WorldChange

    return WorldChange(
        old=BatchPlan(4, 1, 2),
        new=BatchPlan(4, 2, 1),
        epoch=1,
        batches_done=0,
        step=8,
        sums=(0.0, 0),
        lr_factor=1.0,
        old_world=2,
        new_world=1,
    )


class _Events(_Recorder):
    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.fail = fail

    def log_event(self, name: str, data: Any, step: int) -> None:
        if self.fail:
            raise OSError("quota exceeded")
        self.calls.append(("event", (name, dict(data), step)))


def test_l27_1_log_event_reaches_each_open_logger_and_drops_a_failing_one(clean_env, tmp_path):
    """L27-1: ``Loggers.log_event`` calls ``log_event(name, data, step)`` on every open
    logger in order; a logger without the method (the base class's no-op) is fine; one that
    raises is dropped with a LoggerWarning naming it, the event and the error, and gets no
    later call; nothing is called before the loggers are opened."""

    class MetricsOnly(Logger):
        def log_metrics(self, metrics: Any, step: int) -> None:
            pass

    bad, good = _Events(fail=True), _Events()
    group = Loggers([MetricsOnly(), bad, good], tmp_path)
    group.log_event("world_size_change", {"old_world_size": 2}, step=8)
    assert good.calls == [], "an event reached a logger before open()"
    with devlayer.init(backend="cpu"):
        group.open(LoggerRun(folder=tmp_path, resumed=True, step=8))
        with pytest.warns(LoggerWarning, match=r"_Events.*world_size_change.*8.*quota exceeded"):
            group.log_event("world_size_change", {"old_world_size": 2}, step=8)
        group.log_metrics({"global_step": 12, "train_loss": 0.5})
        group.close()
    assert good.calls == [
        ("open", True),
        ("event", ("world_size_change", {"old_world_size": 2}, 8)),
        ("metrics", 12),
        ("close", None),
    ]
    assert bad.calls == [("open", True)], "the failing logger was not dropped"


def test_l27_1_jsonl_writes_the_world_size_change_record_unchanged(clean_env, tmp_path):
    """L27-1: the JSONL logger writes an event as one line ``{"event", "global_step",
    **data}``, so the world-size change routed through ``log_event`` is byte for byte the
    line the metrics file got before (``append_metrics(WorldChange.record())``, which
    ``devlayer plot`` reads)."""
    from devlayer.train.metrics import append_metrics

    change = _a_world_change()
    JsonlLogger(tmp_path / "m.jsonl").log_event("world_size_change", change.data(), change.step)
    append_metrics(tmp_path / "before.jsonl", change.record())
    assert (tmp_path / "m.jsonl").read_bytes() == (tmp_path / "before.jsonl").read_bytes()
    assert json.loads((tmp_path / "m.jsonl").read_text())["event"] == "world_size_change"


def test_l27_1_tensorboard_holds_the_event_as_text_at_its_step(clean_env, tmp_path):
    """L27-1: TensorBoardLogger writes an event as a text entry (tag ``events/<name>``) at
    its step, which TensorBoard's reader returns with the event's fields in it."""
    logger = TensorBoardLogger(log_dir=tmp_path / "tb")
    logger.open(LoggerRun(folder=tmp_path))
    logger.log_event("world_size_change", {"old_world_size": 2, "new_world_size": 1}, 8)
    logger.close()
    ((step, text),) = _tb_texts(tmp_path / "tb")["events/world_size_change/text_summary"]
    assert step == 8
    assert '"old_world_size": 2' in text and '"new_world_size": 1' in text


@pytest.mark.trackers
def test_l27_1_mlflow_holds_the_event_as_a_dict_at_its_step(clean_env, tmp_path):
    """L27-1: MLflowLogger logs an event as a JSON artifact
    ``events/<step>-<name>.json`` of the run, holding the name, the step and the data."""
    logger = MLflowLogger()
    logger.open(LoggerRun(folder=tmp_path, run_id="abc"))
    logger.log_event("world_size_change", {"old_world_size": 2, "new_world_size": 1}, 8)
    logger.close()
    from mlflow.artifacts import download_artifacts

    _, (run,) = _mlflow(tmp_path)
    got = download_artifacts(
        run_id=run.info.run_id,
        artifact_path="events/00000008-world_size_change.json",
        dst_path=str(tmp_path / "dl"),
        tracking_uri=f"sqlite:///{tmp_path.absolute().as_posix()}/mlflow.db",
    )
    assert json.loads(Path(got).read_text()) == {
        "event": "world_size_change",
        "global_step": 8,
        "old_world_size": 2,
        "new_world_size": 1,
    }
