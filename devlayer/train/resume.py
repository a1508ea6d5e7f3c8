"""The Trainer's checkpoint folder: lock, write probe, run identity and resume choice.

:class:`TrainingCheckpoints` is the collective layer over the single-process
:class:`~devlayer.train.checkpoint.CheckpointStore`: rank 0 does the file work and every
rank learns its outcome, so all ranks raise the same error or load the same checkpoint.
The rules are in docs/checkpoints.md ("Run identity").

Example:
    >>> import torch
    >>> model_state_mismatch(torch.nn.Linear(2, 3).state_dict(),
    ...                      torch.nn.Linear(2, 4).state_dict())
    ['weight: saved (3, 2), this model (4, 2)', 'bias: saved (3,), this model (4,)']
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

import devlayer
from devlayer.config import short_repr
from devlayer.errors import DevlayerError
from devlayer.train import errors as _errors
from devlayer.train.checkpoint import CheckpointStore, checkpoint_folder, describe_runs
from devlayer.train.elastic import is_data_position
from devlayer.train.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointRunError,
    PreemptedError,
)
from devlayer.train.rng import is_rng_state
from devlayer.train.signals import on_sigterm

__all__ = [
    "TrainingCheckpoints",
    "check_trainer_payload",
    "model_state_mismatch",
    "sigterm_stops",
]


@contextlib.contextmanager
def sigterm_stops(what: str) -> Iterator[None]:
    """Make SIGTERM end the job while ``what`` runs (main thread only).

    The Trainer turns SIGTERM into a flag read between optimizer steps; before the first
    step nothing reads it, so a resume stuck on a slow or hung file system would ignore it.
    Here it raises :class:`~devlayer.train.errors.PreemptedError` at once instead.
    """

    def stop(signum: int, frame: Any) -> None:
        raise PreemptedError(
            f"received {signal.Signals(signum).name} while {what}; stopped before training "
            "(nothing new to save)"
        )

    with on_sigterm(stop):
        yield


def _error_class(name: str) -> type[Exception]:
    """The exception class a rank re-raises for rank 0's error ``name``."""
    if name == "PreemptedError":
        return PreemptedError
    cls = getattr(_errors, name, None)
    if isinstance(cls, type) and issubclass(cls, CheckpointError):
        return cls
    return CheckpointError


_STATE_DICT = "a dict (a state_dict)"


def _is_int(value: object, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _history_ok(value: object) -> bool:
    entries = value if isinstance(value, list) else None
    return entries is not None and all(
        isinstance(e, dict)
        and all(isinstance(k, str) for k in e)
        and (
            not e.get("partial")
            or (_is_int(e.get("batches")) and _is_int(e.get("batches_per_epoch")))
        )
        for e in entries
    )


def _rank_ok(value: object) -> bool:
    return (
        isinstance(value, Mapping)
        and is_rng_state(value.get("rng"))
        and _is_number(value.get("loss_sum"))
        and _is_int(value.get("samples"))
    )


def _early_stopping_ok(value: object) -> bool:
    return value is None or (
        isinstance(value, Mapping)
        and (value.get("best") is None or _is_number(value.get("best")))
        and _is_int(value.get("bad_epochs"))
        and _is_int(value.get("hits"))
        # Saved since issue 20 (older checkpoints lack them): which metric, which direction.
        and isinstance(value.get("monitor", ""), str)
        and value.get("mode", "min") in ("min", "max")
    )


def _payload_rules(world_size: object, sharded: bool) -> dict[str, tuple[bool, Any, str]]:
    """Field -> (required, check, what is expected) for a Trainer payload."""
    optional_dict = (False, lambda v: v is None or isinstance(v, Mapping), _STATE_DICT + " or None")
    model: tuple[bool, Any, str] = (
        (False, lambda v: v is None, "None (the model is in the shards)")
        if sharded
        else (True, lambda v: isinstance(v, Mapping), _STATE_DICT)
    )
    return {
        "epoch": (True, _is_int, "an int >= 0"),
        "batches_done": (True, _is_int, "an int >= 0"),
        "global_step": (True, _is_int, "an int >= 0"),
        "ranks": (
            True,
            lambda v: isinstance(v, list) and len(v) == world_size and all(map(_rank_ok, v)),
            f"a list of {world_size} dict(s) (one per rank) with 'rng' (an rng_state()), "
            "'loss_sum' (a finite number) and 'samples' (an int >= 0)",
        ),
        "model": model,
        "optimizer": (False, model[1], model[2]),
        "scaler": optional_dict,
        "scheduler": optional_dict,
        "early_stopping": (
            False,
            _early_stopping_ok,
            "None or a dict with 'best' (a finite number or None), 'bad_epochs' and 'hits' "
            "(ints >= 0), and optionally 'monitor' (a str) and 'mode' ('min' or 'max')",
        ),
        "history": (False, _history_ok, "a list of dicts with str keys (one per epoch)"),
        "lr_factor": (False, lambda v: _is_number(v) and v > 0, "a finite number > 0"),
        "data": (
            False,
            lambda v: v is None or is_data_position(v),
            "None or a dict of ints: 'seed', 'epoch', 'consumed' (>= 0), 'per_rank_batch', "
            "'grad_accum' and 'world_size' (>= 1)",
        ),
    }


def check_trainer_payload(
    payload: Mapping[str, Any], manifest: Mapping[str, Any], path: Path
) -> None:
    """Refuse a Trainer payload whose fields the resume would choke on (types and ranges).

    The manifest's checksums prove that a checkpoint is intact, not who wrote it: a payload
    re-saved with a recomputed manifest verifies. Every field the resume reads is checked
    here, before anything is applied.

    Raises:
        CheckpointCorruptError: A field is missing, of the wrong type or out of range; the
            message names the field, the value and what was expected.
    """
    rules = _payload_rules(manifest.get("world_size"), manifest.get("shards") is not None)
    for field, (required, check, expected) in rules.items():
        if field not in payload:
            if not required:
                continue
            problem = f"field {field!r} is missing"
        elif check(payload[field]):
            continue
        else:
            value = payload[field]
            problem = f"field {field!r} is {short_repr(value)} ({type(value).__name__})"
        raise CheckpointCorruptError(
            f"{path}: the saved trainer state's {problem}, expected {expected}. It was not "
            "written by the Trainer (a manifest's checksum proves integrity, not authorship); "
            f"delete {path} (resume then uses an older one), or start a fresh run in a new "
            "checkpoint_dir"
        )


def _fresh_run_refused(store: CheckpointStore) -> CheckpointRunError:
    runs = store.runs()
    steps = [p.name for p in store.list()]
    held = describe_runs(runs) if runs else f"{len(steps)} checkpoint(s): {', '.join(steps[:4])}"
    return CheckpointRunError(
        f"{store.directory} already holds checkpoints of a run ({held}), and this is a fresh "
        "run (resume=None): writing beside them would mix two runs, and a later "
        "resume='auto' could continue the wrong one. Use a new checkpoint_dir, pass "
        "resume='auto' to continue that run, or delete its step folders first"
    )


class TrainingCheckpoints:
    """One ``fit()``'s checkpoint folder: lock, write probe, run identity, resume choice.

    Collective: every rank creates one and calls :meth:`begin` and :meth:`end`. Rank 0
    (the writer) does the file work and every rank learns its outcome, so all ranks raise
    the same error or load the same checkpoint.

    Args:
        directory: The Trainer's ``checkpoint_dir``.
        keep: Checkpoints kept.
        prefix: Folder prefix.
    """

    def __init__(self, directory: str | os.PathLike[str], *, keep: int = 2, prefix: str = "step"):
        self.store = CheckpointStore(directory, keep=keep, prefix=prefix)

    def begin(self, resume: str | os.PathLike[str] | None) -> Path | None:
        """Lock the folder, check it is writable, choose what to resume (collective).

        On rank 0: create the folder, write and remove a probe file, take the folder lock
        (held until :meth:`end`), remove leftovers of dead saves, then apply the run rules:
        ``resume="auto"`` continues the newest verified checkpoint and its run id (a
        folder holding several runs is refused), ``resume=None`` refuses a folder that
        already holds checkpoints, and a path continues that checkpoint's run (refused
        when the folder holds another run's checkpoints). A new run gets a new run id.

        Args:
            resume: ``"auto"``, ``None`` or the path of a checkpoint.

        Returns:
            The checkpoint every rank should load, or None for a fresh run.

        Raises:
            CheckpointError: On every rank alike, with rank 0's message; subclasses
                :class:`CheckpointInUseError` (another job holds the folder),
                :class:`CheckpointRunError` (another run's checkpoints) and the
                verification errors keep their class.
        """
        outcome: tuple[Any, ...] | None = None
        failure: BaseException | None = None
        if devlayer.is_main():
            try:
                with sigterm_stops(f"preparing checkpoint directory {self.store.directory}"):
                    outcome = ("ok", *self._prepare(resume))
            except Exception as exc:
                self.store.release_lock()
                failure, outcome = exc, ("error", type(exc).__name__, str(exc))
        if devlayer.world_size() > 1:
            outcome = devlayer.broadcast_object(outcome, src=0)
        if failure is not None:
            raise failure
        assert outcome is not None
        if outcome[0] == "error":
            raise _error_class(outcome[1])(outcome[2])  # rank 0's error, word for word
        _, path, run_id = outcome
        self.store.run_id = run_id
        return None if path is None else Path(path)

    def _prepare(self, resume: str | os.PathLike[str] | None) -> tuple[str | None, str]:
        store = self.store
        store.check_writable()
        store.acquire_lock()
        store.cleanup_temp()
        if resume is None:
            if store.list():
                raise _fresh_run_refused(store)
            return None, store.new_run_id()
        if isinstance(resume, str) and resume == "auto":
            found = store.latest_verified(None)
            if found is None:
                return None, store.new_run_id()
            path, manifest = found
        else:
            path = checkpoint_folder(resume)
            manifest = store.verify(path)
            others = {k: v for k, v in store.runs().items() if k != manifest.get("run_id")}
            if others:
                held = describe_runs(others)
                raise CheckpointRunError(
                    f"resume={str(resume)!r} continues run {manifest.get('run_id')!r}, but "
                    f"{store.directory} holds checkpoints of another run ({held}); "
                    "use another checkpoint_dir, or move that run's folders away"
                )
        return str(path), manifest.get("run_id") or store.new_run_id()

    @contextlib.contextmanager
    def restoring(self, path: Path) -> Iterator[None]:
        """Around loading ``path`` into the Trainer on each rank.

        SIGTERM stops the job (instead of waiting for a step that never comes), and a
        state that does not fit (torch's ``size mismatch``, optimizer group errors) becomes
        a :class:`CheckpointError` naming the checkpoint and the fix.
        """
        with sigterm_stops(f"resuming from {path}"):
            try:
                yield
            except DevlayerError:
                raise
            except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
                raise CheckpointError(
                    f"cannot restore {path} into this Trainer: {type(exc).__name__}: {exc}. "
                    "It was saved with another model, optimizer or scheduler setup; build "
                    "the same ones as the run that saved it, or start a fresh run in a new "
                    "checkpoint_dir"
                ) from exc

    def check_payload(
        self, payload: Mapping[str, Any], manifest: Mapping[str, Any], model: Any, path: Path
    ) -> None:
        """Cross-check a Trainer payload against its manifest and the model to restore.

        Raises:
            CheckpointCorruptError: A field of the payload has the wrong type or range (see
                :func:`check_trainer_payload`), or the manifest's step differs from the
                saved trainer step.
            CheckpointError: Missing, unexpected or differently shaped model entries; the
                message lists them (saved shape vs this model's).
        """
        check_trainer_payload(payload, manifest, path)
        saved_step = payload["global_step"]
        if saved_step != manifest["step"]:
            raise CheckpointCorruptError(
                f"{path}: the manifest says step {manifest['step']} but the saved trainer "
                f"state is at step {saved_step}; the manifest was edited or belongs to "
                f"another checkpoint. Delete {path} (resume then uses an older one)"
            )
        saved = payload.get("model")
        if isinstance(saved, Mapping):
            problems = model_state_mismatch(saved, model.state_dict())
            if problems:
                raise CheckpointError(
                    f"{path} does not fit this model: {'; '.join(problems)}. It was saved "
                    "from another architecture; build the same model as the run that saved "
                    "it, or start a fresh run in a new checkpoint_dir"
                )

    def end(self) -> None:
        """Release the folder lock (rank 0); safe to call on every rank, more than once."""
        self.store.release_lock()


def model_state_mismatch(
    saved: Mapping[str, Any], current: Mapping[str, Any], *, limit: int = 8
) -> list[str]:
    """Why ``saved`` cannot be loaded into a model whose state_dict is ``current``.

    Args:
        saved: The state_dict in the checkpoint.
        current: ``model.state_dict()`` of the model to restore.
        limit: Most entries listed per kind.

    Returns:
        Human-readable problems (empty when keys and shapes match).

    Example:
        >>> import torch
        >>> model_state_mismatch(torch.nn.Linear(2, 3).state_dict(),
        ...                      torch.nn.Linear(2, 4).state_dict())
        ['weight: saved (3, 2), this model (4, 2)', 'bias: saved (3,), this model (4,)']
    """

    def shape(value: Any) -> tuple[int, ...] | None:
        return tuple(value.shape) if isinstance(value, torch.Tensor) else None

    def some(keys: list[str]) -> str:
        return ", ".join(keys[:limit]) + (
            f" and {len(keys) - limit} more" if len(keys) > limit else ""
        )

    problems = [
        f"{key}: saved {shape(saved[key])}, this model {shape(value)}"
        for key, value in current.items()
        if key in saved and shape(saved[key]) != shape(value)
    ][:limit]
    missing = [k for k in current if k not in saved]
    unexpected = [k for k in saved if k not in current]
    if missing:
        problems.append(f"missing in the checkpoint: {some(missing)}")
    if unexpected:
        problems.append(f"not in this model: {some(unexpected)}")
    return problems
