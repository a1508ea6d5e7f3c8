"""Where the Trainer's epoch metrics go: the JSONL file, TensorBoard, MLflow or your own.

``Trainer(loggers=[...])`` takes names (``"jsonl"``, ``"tensorboard"``, ``"mlflow"``) or
:class:`Logger` objects. Rank 0 alone opens them at the start of ``fit()``, records the
hyperparameters once per run, logs each epoch's metrics at its ``global_step`` (the same
entries and steps as the JSONL file) and closes them when ``fit()`` ends. A resumed run
(``resume="auto"`` or a path, at any world size) continues the same run of each tracker.

A logger of your own subclasses :class:`Logger` and implements ``log_metrics`` (and, if it
wants them, ``log_hparams``, ``log_event``, ``open`` and ``close``):

Example:
    >>> class PrintLogger(Logger):
    ...     def log_metrics(self, metrics, step):
    ...         print(step, {k: round(v, 2) for k, v in scalars(metrics).items()})
    >>> PrintLogger().log_metrics({"epoch": 1, "train_loss": 0.123, "partial": True}, step=4)
    4 {'epoch': 1.0, 'train_loss': 0.12}
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import devlayer
from devlayer.errors import InvalidArgumentError, short_repr
from devlayer.train.checkpoint import CheckpointStore
from devlayer.train.errors import LoggerError, LoggerExtraMissingError, LoggerWarning
from devlayer.train.metrics import append_metrics

__all__ = [
    "JsonlLogger",
    "Logger",
    "LoggerRun",
    "Loggers",
    "MLflowLogger",
    "NAMES",
    "TensorBoardLogger",
    "check_loggers",
    "event_record",
    "require_extra",
    "run_folder",
    "scalars",
    "tracking_uri_for",
    "trainer_hparams",
]

#: The names ``Trainer(loggers=...)`` accepts.
NAMES = ("jsonl", "tensorboard", "mlflow")


@dataclass(frozen=True)
class LoggerRun:
    """What a logger learns when ``fit()`` opens it (on rank 0).

    Attributes:
        folder: The run's folder: ``metrics_file``'s folder, else ``checkpoint_dir``
            (``None`` when the Trainer has neither).
        run_id: The checkpoint run's id (kept across resumes; ``None`` without
            ``checkpoint_dir``).
        resumed: ``fit()`` continues a checkpoint: the hyperparameters are already recorded.
        step: The optimizer step training starts from (0, or the resumed checkpoint's).
        hparams: The run's hyperparameters (also passed to :meth:`Logger.log_hparams`).
    """

    folder: Path | None
    run_id: str | None = None
    resumed: bool = False
    step: int = 0
    hparams: Mapping[str, Any] = field(default_factory=dict)


class Logger(ABC):
    """One destination of the Trainer's metrics; only rank 0 calls its methods."""

    def open(self, run: LoggerRun) -> None:  # noqa: B027 (optional hook)
        """Start (or, when ``run.resumed``, continue) the run; called once per ``fit()``."""

    def log_hparams(self, params: Mapping[str, Any]) -> None:  # noqa: B027 (optional hook)
        """Record the hyperparameters: once per run, never again on a resume."""

    @abstractmethod
    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Record one epoch's entry (as in the history) at optimizer step ``step``."""

    def log_event(  # noqa: B027 (optional hook)
        self, name: str, data: Mapping[str, Any], step: int
    ) -> None:
        """Record something that happened to the run at optimizer step ``step``.

        Args:
            name (str): What happened, e.g. ``"world_size_change"`` (a resume at another
                world size, the reason a loss curve may jump there).
            data (Mapping[str, Any]): Its details, JSON-serializable.
            step (int): The optimizer step it happened at.
        """

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Flush and release; called when ``fit()`` returns or raises."""


def event_record(name: str, data: Mapping[str, Any], step: int) -> dict[str, Any]:
    """An event as the JSONL file holds it: its name and step first, then its data.

    Example:
        >>> event_record("world_size_change", {"old_world_size": 2}, 8)
        {'event': 'world_size_change', 'global_step': 8, 'old_world_size': 2}
    """
    return {"event": name, "global_step": step, **data}


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a history entry, ``global_step`` (the step itself) and flags left out.

    Example:
        >>> scalars({"epoch": 2, "global_step": 8, "train_loss": 0.5, "partial": True,
        ...          "stopped_by": "max_steps"})
        {'epoch': 2.0, 'train_loss': 0.5}
    """
    return {
        key: float(value)
        for key, value in metrics.items()
        if key != "global_step" and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


#: The module each named logger imports, and the extra that installs it.
_EXTRAS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}


def require_extra(name: str) -> None:
    """Raise unless the package behind logger ``name`` is installed (no import: cheap).

    Raises:
        LoggerExtraMissingError: It is missing; the message names the extra to install.
    """
    if name not in _EXTRAS:
        return
    module, extra = _EXTRAS[name]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise LoggerExtraMissingError(
            f"loggers=[{name!r}] needs the {module!r} package, which is not installed; "
            f"install it with: pip install 'devlayer[{extra}]'"
        )


def run_folder(metrics_file: Path | None, checkpoint_dir: Path | None) -> Path | None:
    """The run's folder, where the trackers write: ``metrics_file``'s folder, else
    ``checkpoint_dir``, else ``None``.

    Example:
        >>> run_folder(Path("runs/exp1/metrics.jsonl"), Path("ckpt")).as_posix()
        'runs/exp1'
        >>> run_folder(None, Path("ckpt")).as_posix()
        'ckpt'
    """
    if metrics_file is not None:
        return metrics_file.parent
    return checkpoint_dir


def tracking_uri_for(
    explicit: str | None, env: Mapping[str, str], folder: Path | None
) -> str | None:
    """MLflow's tracking URI: ``explicit``, else ``MLFLOW_TRACKING_URI``, else an SQLite file
    in ``folder`` (MLflow 3's default store, no server); ``None`` when there is none.

    Example:
        >>> tracking_uri_for(None, {}, Path("/runs/a"))
        'sqlite:////runs/a/mlflow.db'
        >>> tracking_uri_for(None, {"MLFLOW_TRACKING_URI": "http://srv:5000"}, Path("x"))
        'http://srv:5000'
    """
    if explicit:
        return explicit
    if env.get("MLFLOW_TRACKING_URI"):
        return env["MLFLOW_TRACKING_URI"]
    if folder is None:
        return None
    return f"sqlite:///{folder.absolute().as_posix()}/mlflow.db"


class JsonlLogger(Logger):
    """One JSON line per epoch in ``path`` (what ``metrics_file`` writes; ``devlayer plot``
    draws it). A resumed run appends to the same file.

    Args:
        path: The ``.jsonl`` file (its folder is created).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Append the whole entry (flags and strings included) as one line."""
        append_metrics(self.path, metrics)

    def log_event(self, name: str, data: Mapping[str, Any], step: int) -> None:
        """Append ``{"event": name, "global_step": step, **data}`` as one line (not an
        epoch: ``devlayer plot`` marks it on the figure)."""
        append_metrics(self.path, event_record(name, data, step))

    def __repr__(self) -> str:
        return f"JsonlLogger({os.fspath(self.path)!r})"


class TensorBoardLogger(Logger):
    """TensorBoard event files: one scalar per metric at the epoch's ``global_step``, and the
    hyperparameters in the HParams tab. Needs ``pip install 'devlayer[tensorboard]'``.

    Each run has its own folder, ``<run folder>/tensorboard/<checkpoint run id>`` (a new
    id per ``fit()`` without ``checkpoint_dir``). A resumed run writes to the same folder
    with ``purge_step`` just after the resumed step, so points a crashed attempt logged
    past its last checkpoint are hidden.

    Args:
        log_dir: The folder, instead of one per run under the run's folder.
    """

    def __init__(self, log_dir: str | os.PathLike[str] | None = None) -> None:
        require_extra("tensorboard")
        self.log_dir = Path(log_dir) if log_dir is not None else None
        #: The folder of the event files, once opened.
        self.folder: Path | None = None
        self.writer: Any = None

    def open(self, run: LoggerRun) -> None:
        """Create the writer in :attr:`folder` (purging past the resumed step)."""
        from torch.utils.tensorboard import SummaryWriter

        if self.log_dir is not None:
            self.folder = self.log_dir
        else:  # one TensorBoard run per checkpoint run (a fresh one without checkpoints)
            name = run.run_id or CheckpointStore.new_run_id()
            self.folder = _needs_folder(run, "tensorboard") / "tensorboard" / name
        purge = run.step + 1 if run.resumed else None
        self.writer = SummaryWriter(os.fspath(self.folder), purge_step=purge)

    def log_hparams(self, params: Mapping[str, Any]) -> None:
        """The HParams plugin's records, in the same event file as the scalars."""
        from torch.utils.tensorboard.summary import hparams

        values = {k: v if isinstance(v, (int, float, str)) else str(v) for k, v in params.items()}
        writer = self.writer._get_file_writer()
        for summary in hparams(values, {}):
            writer.add_summary(summary)
        self.writer.flush()

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """One scalar per number of the entry, at ``step``; flushed at once."""
        for key, value in scalars(metrics).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_event(self, name: str, data: Mapping[str, Any], step: int) -> None:
        """A text entry ``events/<name>`` at ``step`` (the TEXT tab): the data as JSON."""
        text = json.dumps(dict(data), indent=2, default=str)
        # Indented four spaces: a code block in the TEXT tab's markdown, kept as written.
        self.writer.add_text(f"events/{name}", "    " + text.replace("\n", "\n    "), step)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class MLflowLogger(Logger):
    """An MLflow run: parameters once, each metric at the epoch's ``global_step``.
    Needs ``pip install 'devlayer[mlflow]'``; no server unless you name one.

    The run is tagged ``devlayer.run_id`` with the checkpoint run's id; a resumed
    ``fit()`` finds it by that tag and continues it (at any world size).

    Args:
        tracking_uri: Where runs go. Default: ``MLFLOW_TRACKING_URI``, else
            ``sqlite:///<run folder>/mlflow.db`` (MLflow 3's local default store).
        experiment: The experiment's name (created when missing).
        run_name: The new run's name (default: MLflow picks one).
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        *,
        experiment: str = "devlayer",
        run_name: str | None = None,
    ) -> None:
        require_extra("mlflow")
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.client: Any = None
        self.run_id: str | None = None

    def open(self, run: LoggerRun) -> None:
        """Connect, then reopen the run tagged with ``run.run_id`` or start a new one."""
        from mlflow.tracking import MlflowClient

        uri = tracking_uri_for(self.tracking_uri, os.environ, run.folder)
        if uri is None:
            _needs_folder(run, "mlflow")
        local = run.folder if uri == tracking_uri_for(None, {}, run.folder) else None
        if local is not None:  # MLflow creates the database file, not its folder
            local.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=uri)
        experiment_id = self._experiment(local)
        self.run_id = self._find(experiment_id, run.run_id) if run.resumed else None
        if self.run_id is not None:
            self.client.update_run(self.run_id, status="RUNNING")
            return
        tags = {"devlayer.run_id": run.run_id} if run.run_id else None
        made = self.client.create_run(experiment_id, tags=tags, run_name=self.run_name)
        self.run_id = made.info.run_id
        if run.resumed:  # resumed from checkpoints that had no MLflow run yet
            self.log_hparams(run.hparams)

    def _experiment(self, folder: Path | None) -> str:
        """The experiment's id, created (artifacts under ``folder``) when missing."""
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return str(found.experiment_id)
        where = (folder / "mlartifacts").absolute().as_uri() if folder is not None else None
        return str(self.client.create_experiment(self.experiment, where))

    def _find(self, experiment_id: str, run_id: str | None) -> str | None:
        if not run_id:
            return None
        found = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`devlayer.run_id` = '{run_id}'"
        )
        return found[0].info.run_id if found else None

    def log_hparams(self, params: Mapping[str, Any]) -> None:
        """The hyperparameters as the run's parameters (strings, as MLflow keeps them)."""
        from mlflow.entities import Param

        batch = [Param(k, str(v)) for k, v in params.items()]
        self.client.log_batch(self.run_id, params=batch)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """One metric per number of the entry, at ``step``."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in scalars(metrics).items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_event(self, name: str, data: Mapping[str, Any], step: int) -> None:
        """The JSON artifact ``events/<step, 8 digits>-<name>.json`` of the run (the
        JSONL line's fields), listed in step order in the run's artifacts."""
        record = json.loads(json.dumps(event_record(name, data, step), default=str))
        self.client.log_dict(self.run_id, record, f"events/{step:08d}-{name}.json")

    def close(self) -> None:
        """Mark the run finished (a resume sets it running again)."""
        if self.client is not None and self.run_id is not None:
            self.client.set_terminated(self.run_id)
        self.client = None


def _no_folder(name: str) -> str:
    """The message for a logger that has no folder to write in."""
    where = {"tensorboard": "TensorBoardLogger(log_dir='runs/exp1')"}.get(
        name, "MLflowLogger(tracking_uri=...) or MLFLOW_TRACKING_URI"
    )
    return (
        f"loggers=[{name!r}] writes under the run's folder, but the Trainer has neither "
        f"metrics_file nor checkpoint_dir; pass one of them (the folder of metrics_file, "
        f"else checkpoint_dir, is the run's folder), or {where}"
    )


def _needs_folder(run: LoggerRun, name: str) -> Path:
    if run.folder is None:
        raise LoggerError(_no_folder(name))
    return run.folder


def check_loggers(name: str, value: Any) -> None:
    """``Trainer(loggers=...)``: a list of known names and :class:`Logger` objects, each
    name once; the packages behind the names are installed.

    Raises:
        InvalidArgumentError: Not a list or tuple (a generator would be used up by the
            check), an unknown name (the known ones listed), a name twice, or an item of
            another type.
        LoggerExtraMissingError: A named logger's extra is not installed.
    """
    if not isinstance(value, (list, tuple)):
        raise InvalidArgumentError(
            f"{name}={short_repr(value)} must be a list (or tuple) of logger names "
            f"({', '.join(NAMES)}) or devlayer.train.loggers.Logger objects, "
            f"e.g. {name}=['tensorboard']"
        )
    items = list(value)
    for i, item in enumerate(items):
        if isinstance(item, Logger):
            continue
        if not isinstance(item, str) or item not in NAMES:
            raise InvalidArgumentError(
                f"{name}={short_repr(items)}: {name}[{i}]={short_repr(item)} is not a "
                f"logger; use one of {', '.join(NAMES)} or a devlayer.train.loggers.Logger "
                "object (subclass it and define log_metrics)"
            )
        if items.count(item) > 1:
            raise InvalidArgumentError(f"{name}={short_repr(items)} names {item!r} twice; keep one")
        require_extra(item)


class Loggers:
    """The Trainer's loggers together: opened, fed and closed on rank 0.

    A logger that fails while training runs is dropped with a :class:`LoggerWarning`
    (training goes on: an exception on rank 0 alone would leave the other ranks waiting
    in the next collective); one that cannot be opened fails ``fit()`` on every rank.

    Args:
        items: The loggers, in call order.
        folder: The run's folder (see :func:`run_folder`).
    """

    def __init__(self, items: list[Logger], folder: Path | None) -> None:
        self.items = items
        self.folder = folder
        self.open_items: list[Logger] = []

    @classmethod
    def build(
        cls,
        loggers: Iterable[str | Logger],
        *,
        metrics_file: Path | None,
        checkpoint_dir: Path | None,
    ) -> Loggers:
        """The loggers of ``Trainer(loggers=..., metrics_file=..., checkpoint_dir=...)``.

        ``metrics_file`` alone keeps writing the JSONL file (``"jsonl"`` is implied); the
        name ``"jsonl"`` without it writes ``<checkpoint_dir>/metrics.jsonl``.

        Raises:
            InvalidArgumentError: A named logger has no folder to write in.
        """
        names = list(loggers)
        folder = run_folder(metrics_file, checkpoint_dir)
        if metrics_file is not None and "jsonl" not in names:
            names.insert(0, "jsonl")
        items: list[Logger] = []
        for item in names:
            if isinstance(item, Logger):
                items.append(item)
                continue
            server = item == "mlflow" and tracking_uri_for(None, os.environ, None)
            if folder is None and not server:
                raise InvalidArgumentError(_no_folder(item))
            if item == "jsonl":
                items.append(JsonlLogger(metrics_file or Path(folder or ".") / "metrics.jsonl"))
            else:
                items.append(TensorBoardLogger() if item == "tensorboard" else MLflowLogger())
        return cls(items, folder)

    def start(self, trainer: Any) -> None:
        """:meth:`open` for ``trainer``'s run, after it resumed (collective)."""
        if self.items:
            self.open(
                LoggerRun(
                    folder=self.folder,
                    run_id=trainer.checkpoints.run_id,
                    resumed=trainer.resumed_from is not None,
                    step=trainer.state.global_step,
                    hparams=trainer_hparams(trainer),
                )
            )

    def open(self, run: LoggerRun) -> None:
        """Open every logger on rank 0 and record the hyperparameters of a new run
        (collective when there are loggers: every rank raises rank 0's error alike).

        Raises:
            LoggerError: A logger could not be opened; the message names it and why.
        """
        if not self.items:
            return
        error = None
        if devlayer.is_main():
            self.open_items = []
            for logger in self.items:
                try:
                    logger.open(run)
                    if not run.resumed:
                        logger.log_hparams(run.hparams)
                except Exception as exc:
                    error = f"{logger!r} could not be opened: {type(exc).__name__}: {exc}"
                    break
                self.open_items.append(logger)
        if devlayer.world_size() > 1:
            error = devlayer.broadcast_object(error, src=0)
        if error is not None:
            self.close()
            raise LoggerError(f"rank 0: {error}")

    def log_metrics(self, metrics: Mapping[str, Any]) -> None:
        """One epoch's entry to every open logger, at its ``global_step`` (rank 0)."""
        step = int(metrics["global_step"])
        self._each(f"step {step}", lambda logger: logger.log_metrics(metrics, step))

    def log_event(self, name: str, data: Mapping[str, Any], step: int) -> None:
        """One event (see :meth:`Logger.log_event`) to every open logger (rank 0: the
        other ranks have none open)."""
        self._each(f"event {name!r} at step {step}", lambda x: x.log_event(name, data, step))

    def _each(self, what: str, call: Callable[[Logger], None]) -> None:
        """``call`` each open logger; one that raises is dropped with a LoggerWarning."""
        for logger in list(self.open_items):
            try:
                call(logger)
            except Exception as exc:
                self.open_items.remove(logger)
                warnings.warn(
                    f"{logger!r} failed to log {what} ({type(exc).__name__}: {exc}); "
                    "it is dropped for the rest of this fit(), training goes on",
                    LoggerWarning,
                    stacklevel=3,
                )

    def close(self) -> None:
        """Close the open loggers (a failure is a :class:`LoggerWarning`); safe twice."""
        items, self.open_items = self.open_items, []
        for logger in items:
            try:
                logger.close()
            except Exception as exc:
                warnings.warn(f"{logger!r} failed to close: {exc}", LoggerWarning, stacklevel=2)


def trainer_hparams(trainer: Any) -> dict[str, Any]:
    """The hyperparameters a Trainer records once per run (at the start of ``fit()``)."""
    optimizer = trainer.optimizer
    return {
        "model": type(trainer.model).__name__,
        "optimizer": type(optimizer).__name__,
        "lr": float(optimizer.param_groups[0]["lr"]),
        "batch_size": trainer.batch_size,
        "grad_accum": trainer.grad_accum,
        "precision": trainer.precision,
        "clip_grad": trainer.clip_grad,
        "max_epochs": trainer.max_epochs,
        "max_steps": trainer.max_steps,
        "seed": trainer.seed,
        "lr_scaling": trainer.lr_scaling,
        "strategy": trainer.strategy.name,
        "world_size": devlayer.world_size(),
    }
