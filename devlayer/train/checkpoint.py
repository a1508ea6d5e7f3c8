"""Atomic, verified checkpoints that load without running code from the file.

A :class:`CheckpointStore` keeps numbered checkpoints in one directory, one folder each::

    <directory>/
      step-000001000/
        state.pt          torch.save(payload)
        manifest.json     format version, step, epoch, world size, versions, sha256, size
      step-000002000/
      .tmp-step-000003000.new.<pid>.<hex>/     a save in progress (or one that crashed)

A save writes a temporary folder, syncs every file and the folder to disk and renames the
folder to its final name in one step, so a final name always holds a complete checkpoint.
:meth:`CheckpointStore.latest` returns the newest checkpoint whose manifest and sha256 check
out, skipping damaged ones with a :class:`CheckpointWarning`; :meth:`CheckpointStore.load`
reads ``state.pt`` with ``torch.load(..., weights_only=True)`` only, so a checkpoint cannot
run code on the machine that loads it.

The store is single-process: it runs no collectives. In a multi-rank job call it on rank 0
and share the outcome (see ``docs/checkpoints.md``); :class:`TrainingCheckpoints` does that
for the Trainer. One job writes a folder at a time: :meth:`CheckpointStore.lock` takes a
POSIX record lock on ``.lock-<prefix>`` (dropped by the kernel when its process dies), and
each manifest records a ``run_id`` so that resuming never continues another run by guess.

Example:
    >>> import tempfile, torch
    >>> store = CheckpointStore(tempfile.mkdtemp(), keep=2)
    >>> path = store.save({"w": torch.ones(2)}, step=10, epoch=0, world_size=1)
    >>> path.name
    'step-000000010'
    >>> payload, manifest = store.load()
    >>> payload["w"].tolist(), manifest["step"]
    ([1.0, 1.0], 10)
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import secrets
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NoReturn, cast

import torch

import devlayer
from devlayer.errors import InvalidArgumentError
from devlayer.train import manifest as manifests
from devlayer.train.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointInUseError,
    CheckpointRunError,
    CheckpointVersionError,
    CheckpointWarning,
    CheckpointWorldSizeError,
)
from devlayer.train.files import (
    HashingWriter,
    find_os_error,
    fsync_dir,
    host_tag,
    not_a_folder,
    open_regular,
    os_error_advice,
    pid_alive,
    remove_path,
    sha256_file,
    write_atomically,
)
from devlayer.train.lock import LOCK_PREFIX, FolderLock
from devlayer.train.manifest import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    SHARDS_DIR,
    STATE_FILE,
)
from devlayer.train.plain import to_plain
from devlayer.train.rng import rng_state, set_rng_state

if TYPE_CHECKING:
    from torch.serialization import MAP_LOCATION as MapLocation

__all__ = [
    "FORMAT_VERSION",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointInUseError",
    "CheckpointRunError",
    "CheckpointStore",
    "CheckpointVersionError",
    "CheckpointWarning",
    "CheckpointWorldSizeError",
    "rng_state",
    "set_rng_state",
    "to_plain",
    "write_state_file",
]

#: Every name that starts with this is work in progress (or left by a crash) and never a
#: checkpoint: list() and latest() skip it, cleanup_temp() removes it.
TEMP_PREFIX = ".tmp-"

#: Test hook: called with the temporary folder after it is completely written and synced,
#: just before it is renamed into place. Tests raise from it to simulate a crash there.
_before_commit: Callable[[Path], None] | None = None


#: The write probe stands for the longest names a save writes: a step of 13 digits and a
#: shard file name longer than DCP's (``__<rank>_<n>.distcp``) and than ``manifest.json``.
_PROBE_STEP = 10**12
_PROBE_FILE = "__999999_999999.distcp.probe"


_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _int_arg(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(
            f"{name}={value!r} ({type(value).__name__}) is not an integer; pass an int >= {minimum}"
        )
    if value < minimum:
        raise InvalidArgumentError(f"{name}={value} is out of range; pass an int >= {minimum}")
    return value


def _path_arg(name: str, value: object) -> Path:
    """``value`` as a Path, or InvalidArgumentError naming ``name`` (not pathlib's TypeError)."""
    if not isinstance(value, (str, os.PathLike)) or isinstance(os.fspath(value), bytes):
        raise InvalidArgumentError(
            f"{name}={value!r} ({type(value).__name__}) is not a path; pass a str or "
            "pathlib.Path naming the checkpoint folder (e.g. 'checkpoints')"
        )
    return Path(value)


def _unsafe_globals(state_path: Path) -> list[str]:
    """Classes and functions in a torch.save file that weights_only loading refuses.

    A static scan of the pickle (nothing is executed); empty when the scan is not possible
    (not a torch.save zip, or a torch without the helper).
    """
    scan = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if scan is None:
        return []
    try:
        return sorted(scan(str(state_path)))
    except Exception:
        return []


def checkpoint_folder(path: str | os.PathLike[str]) -> Path:
    """The checkpoint folder for ``path`` (the folder itself or its ``state.pt``)."""
    p = Path(path)
    folder = p.parent if p.name == STATE_FILE and not p.is_dir() else p
    if not folder.is_dir():
        raise CheckpointError(
            f"{p} is not a checkpoint folder: expected a folder holding {MANIFEST_FILE} and "
            f"{STATE_FILE} as written by CheckpointStore.save (or the path of its {STATE_FILE}); "
            "check the path, or use CheckpointStore.latest() to find the newest one"
        )
    return folder


def _load_state(state: Path, map_location: MapLocation) -> Any:
    # weights_only=True only, never a fallback to full pickle and no extra safe globals:
    # a checkpoint is data, and loading one must not run code from it.
    fd = open_regular(state, f"delete {state.parent}")
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            return torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _unsafe_globals(state)
        named = f" (found: {', '.join(found)})" if found else ""
        raise CheckpointCorruptError(
            f"{state} contains objects that are not plain tensors, numbers, strings or "
            f"containers{named}; unpickling them could run arbitrary code, and devlayer "
            "refuses to run code from checkpoints (it loads with weights_only=True only). "
            "If you wrote this file yourself, save state_dict()s and plain values instead "
            "(see devlayer.train.checkpoint.to_plain); never load untrusted checkpoints "
            "with full pickle"
        ) from exc
    except Exception as exc:
        raise CheckpointError(
            f"torch.load could not read {state} with map_location={map_location!r}: {exc}"
        ) from exc
    finally:
        os.close(fd)


def _torch_save(obj: Any, file: IO[bytes]) -> None:
    """``torch.save`` that re-raises the file's own OSError (torch wraps it)."""
    writer = HashingWriter(file)
    try:
        torch.save(obj, cast(IO[bytes], writer))
    except Exception as exc:
        os_error = writer.error or find_os_error(exc)
        if os_error is not None and os_error is not exc:
            raise os_error from exc
        raise


def write_state_file(path: str | os.PathLike[str], state: Mapping[str, Any]) -> Path:
    """``torch.save(state)`` to ``path`` atomically: the whole new file or the old one.

    Writes a hidden temporary file beside ``path``, syncs it and renames it over ``path``
    (the export of :meth:`devlayer.Trainer.export`). Only a missing or regular file is
    replaced: a FIFO, a device, a directory or a symlink at ``path`` is refused.

    Args:
        path: The file to write; its folder must exist.
        state: What to save (a ``state_dict``).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        CheckpointError: ``path`` is no regular file, or writing failed (full disk, file
            size limit, permissions...); ``path`` is then as it was.

    Example:
        >>> import tempfile, torch
        >>> p = write_state_file(Path(tempfile.mkdtemp()) / "m.pt", {"w": torch.ones(1)})
        >>> torch.load(p, weights_only=True)["w"].tolist()
        [1.0]
    """
    target = Path(path)
    try:
        write_atomically(target, lambda f: _torch_save(dict(state), f))
    except CheckpointError:
        raise
    except Exception as exc:
        os_error = find_os_error(exc)
        why = f"{type(exc).__name__}: {exc}" if os_error is None else str(os_error)
        advice = "check the state" if os_error is None else os_error_advice(os_error)
        raise CheckpointError(
            f"could not write {target}: {why}; {advice}. Nothing was replaced"
        ) from exc
    return target


_Steps = list[int]  # ``list`` is a method name inside CheckpointStore


def describe_runs(runs: Mapping[str, _Steps]) -> str:
    """``run 'a' (steps 10, 20), run 'b' (step 4)`` for messages."""
    parts = []
    for run, steps in runs.items():
        shown = ", ".join(map(str, steps[:6])) + (", ..." if len(steps) > 6 else "")
        parts.append(f"run {run!r} (step{'s' if len(steps) > 1 else ''} {shown})")
    return ", ".join(parts)


def _warn_skip(path: Path, error: CheckpointError) -> None:
    warnings.warn(
        f"skipping checkpoint {path}: {error}; trying an older one",
        CheckpointWarning,
        stacklevel=4,
    )


class CheckpointStore:
    """Numbered, atomically written and verified checkpoints in one directory.

    Args:
        directory: Where checkpoints live; created on the first save.
        keep: How many checkpoints to keep (>= 1); older ones are deleted after each
            successful save.
        prefix: Folder names are ``<prefix>-<step:09d>``; letters, digits, ``_ . -``, not
            starting with a dot. Stores with different prefixes can share a directory.
        run_id: Recorded in each manifest this store writes; it tells runs apart, so
            :meth:`latest` never mixes checkpoints of two runs (see ``docs/checkpoints.md``).
            Letters, digits and ``_ . : -``, at most 128.
        private: Create checkpoint folders ``0700`` and files ``0600`` whatever the umask
            (default: the umask decides, usually world-readable).

    Raises:
        InvalidArgumentError: ``directory`` is not a str or path, ``keep`` below 1 or not an
            int, or an unusable ``prefix`` or ``run_id``.

    Example:
        >>> import tempfile, torch
        >>> store = CheckpointStore(tempfile.mkdtemp(), keep=1)
        >>> for step in (1, 2):
        ...     _ = store.save({"step": step}, step=step, epoch=0, world_size=1)
        >>> [p.name for p in store.list()]
        ['step-000000002']
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep: int = 2,
        prefix: str = "step",
        run_id: str | None = None,
        private: bool = False,
    ) -> None:
        self.directory = _path_arg("directory", directory)
        self.keep = _int_arg("keep", keep, 1)
        if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
            raise InvalidArgumentError(
                f"prefix={prefix!r} cannot name checkpoint folders; use letters, digits, "
                "'_', '.' and '-', not starting with '.' or '-' (e.g. 'step')"
            )
        valid_run_id = isinstance(run_id, str) and manifests.RUN_ID.fullmatch(run_id)
        if run_id is not None and not valid_run_id:
            raise InvalidArgumentError(
                f"run_id={run_id!r} cannot be recorded; use up to 128 letters, digits and "
                "'_', '.', ':', '-' (e.g. CheckpointStore.new_run_id())"
            )
        self.prefix = prefix
        self.run_id = run_id
        self.private = bool(private)
        self._name = re.compile(rf"{re.escape(prefix)}-(\d+)")
        self._temp_name = re.compile(
            rf"{re.escape(TEMP_PREFIX + prefix)}-(\d+)\.(new|old|del|probe)\.(.+)"
        )
        self._lock = FolderLock(self.directory / f"{LOCK_PREFIX}{prefix}", private=self.private)

    @staticmethod
    def new_run_id() -> str:
        """A fresh random run id (UTC time and 8 random hex digits)."""
        return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"

    def __repr__(self) -> str:
        return f"CheckpointStore({str(self.directory)!r}, keep={self.keep}, prefix={self.prefix!r})"

    def path_for(self, step: int) -> Path:
        """The folder a checkpoint of ``step`` has once saved.

        Example:
            >>> CheckpointStore("ckpt").path_for(42).as_posix()
            'ckpt/step-000000042'
        """
        return self.directory / f"{self.prefix}-{_int_arg('step', step, 0):09d}"

    def _temp_path(self, final: Path, kind: str) -> Path:
        # pid and host say whose it is: cleanup_temp() never removes a live process's.
        name = f"{TEMP_PREFIX}{final.name}.{kind}.{os.getpid()}.{host_tag()}"
        return self.directory / f"{name}.{secrets.token_hex(4)}"

    def _mkdir(self, path: Path, *, parents: bool = False) -> None:
        try:
            path.mkdir(parents=parents, exist_ok=parents, mode=0o700 if self.private else 0o777)
        except FileExistsError:
            # pathlib says "File exists" for a symlink loop or a file at the name: say which.
            if not parents:
                raise
            raise not_a_folder(path) from None
        if self.private:
            os.chmod(path, 0o700)

    # -- the folder lock -----------------------------------------------------------------

    @property
    def lock_path(self) -> Path:
        """The lock file, ``<directory>/.lock-<prefix>``."""
        return self._lock.path

    @property
    def locked(self) -> bool:
        """Whether this store holds the folder lock now."""
        return self._lock.held

    def acquire_lock(self) -> None:
        """Take the folder lock for this process (non-blocking); see :meth:`lock`.

        Raises:
            CheckpointInUseError: Another process, or another store in this process, holds
                it; the message names the holder (host, pid, start time, job id).
            CheckpointError: The lock file cannot be created (the message says why).
        """
        if self._lock.held:
            return
        try:
            self._mkdir(self.directory, parents=True)
        except OSError as exc:
            raise CheckpointError(
                f"cannot create checkpoint directory {self.directory}: {exc}; "
                f"{os_error_advice(exc)}"
            ) from exc
        self._lock.acquire()

    def release_lock(self) -> None:
        """Drop the folder lock, if this store holds it."""
        self._lock.release()

    @contextlib.contextmanager
    def lock(self) -> Iterator[CheckpointStore]:
        """Hold the folder lock for the ``with`` block: one writing job per folder.

        A POSIX record lock on ``.lock-<prefix>``; the kernel drops it when the process
        exits (also on SIGKILL), so a killed job never leaves a stale lock on a local disk.
        A multi-rank job takes it on the rank that writes (the Trainer: rank 0).

        Raises:
            CheckpointInUseError: Another job holds it; the message names the holder.

        Example:
            >>> import tempfile
            >>> store = CheckpointStore(tempfile.mkdtemp())
            >>> with store.lock():
            ...     CheckpointStore(store.directory).acquire_lock()
            Traceback (most recent call last):
            ...
            devlayer.train.errors.CheckpointInUseError: ...
        """
        self.acquire_lock()
        try:
            yield self
        finally:
            self.release_lock()

    def check_writable(self) -> None:
        """Create, fsync and remove a probe: find an unwritable directory early.

        The probe is a folder named like a temporary checkpoint of a 13-digit step holding
        a ``shards/`` file with a long name, so a path too long for the names a save writes
        fails here ("File name too long"), not at the first save.

        Raises:
            CheckpointError: The directory cannot be created or written (read-only mount,
                permissions, full disk, too long a path); the message names it and the OS
                error.
        """
        probe = self._temp_path(self.path_for(_PROBE_STEP), "probe")
        try:
            self._mkdir(self.directory, parents=True)
            try:
                self._mkdir(probe)
                self._mkdir(probe / SHARDS_DIR)
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
                fd = os.open(probe / SHARDS_DIR / _PROBE_FILE, flags, 0o600)
                try:
                    os.write(fd, b"devlayer write probe\n")
                    os.fsync(fd)
                finally:
                    os.close(fd)
            finally:
                shutil.rmtree(probe, ignore_errors=True)  # a fresh random name: ours
            fsync_dir(self.directory)
        except OSError as exc:
            raise CheckpointError(
                f"checkpoint directory {self.directory} is not usable: {exc}; "
                f"{os_error_advice(exc)}. Checked before training, so no work is lost"
            ) from exc

    # -- writing -------------------------------------------------------------------------

    def save(
        self,
        payload: Mapping[str, Any],
        *,
        step: int,
        epoch: int,
        world_size: int,
        extra: Mapping[str, Any] | None = None,
        temp: Path | None = None,
    ) -> Path:
        """Write one checkpoint atomically and prune old ones; returns its folder.

        The payload goes to ``state.pt`` with ``torch.save``; ``manifest.json`` records
        ``format_version``, ``step``, ``epoch``, ``world_size``, ``torch_version``,
        ``devlayer_version``, ``created`` (UTC, ISO 8601), ``sha256`` and ``size`` of
        ``state.pt``, and ``extra``. Both are written into ``.tmp-...`` in the same
        directory, flushed and fsynced, then the folder is renamed to
        ``<prefix>-<step:09d>`` and the directory fsynced. Saving a step that exists replaces
        it (the old folder is renamed aside first, then removed). Afterwards only the newest
        ``keep`` checkpoints remain; the one just written is always kept.

        Args:
            payload: A dict of tensors, numbers, strings, ``None`` and lists / tuples / dicts
                of them (``state_dict()`` results are fine). Anything else is refused before
                anything is committed, because it could not be loaded with
                ``weights_only=True``; :func:`to_plain` converts common cases.
            step: Global step (>= 0); names the folder.
            epoch: Epoch (>= 0), recorded in the manifest.
            world_size: Number of ranks that trained (>= 1), checked on load.
            extra: JSON-serializable values to record in the manifest (e.g. metrics).
            temp: A folder from :meth:`new_temp` that other writers already filled: its
                ``shards/`` files (a sharded checkpoint, written by every rank) are
                recorded in the manifest with their sizes and sha256 (format 3), and it
                becomes the checkpoint together with ``state.pt``.

        Returns:
            The checkpoint folder.

        Raises:
            InvalidArgumentError: A bad step / epoch / world_size, a payload that is not a
                mapping, or ``extra`` that is not strict JSON.
            CheckpointError: Writing failed (full disk, permissions...) or the payload holds
                objects that ``weights_only`` loading refuses. Nothing is left behind and
                earlier checkpoints are untouched.

        Example:
            >>> import tempfile, torch
            >>> store = CheckpointStore(tempfile.mkdtemp())
            >>> p = store.save({"model": torch.nn.Linear(2, 1).state_dict()}, step=5,
            ...                epoch=1, world_size=1, extra={"loss": 0.25})
            >>> sorted(f.name for f in p.iterdir())
            ['manifest.json', 'state.pt']
        """
        if not isinstance(payload, Mapping):
            raise InvalidArgumentError(
                f"payload is a {type(payload).__name__}, expected a dict "
                "(e.g. {'model': model.state_dict(), 'step': step})"
            )
        _int_arg("step", step, 0)
        _int_arg("epoch", epoch, 0)
        _int_arg("world_size", world_size, 1)
        extra_plain: dict[str, Any] = dict(extra or {})
        try:
            json.dumps(extra_plain, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(
                f"extra={extra!r} cannot be stored as JSON ({exc}); pass str / int / float "
                "(finite) / bool / None values and lists / dicts of them"
            ) from exc
        data = payload if isinstance(payload, dict) else dict(payload)
        final = self.path_for(step)
        temp = self.new_temp(step) if temp is None else temp
        try:
            self._write(
                temp, data, step=step, epoch=epoch, world_size=world_size, extra=extra_plain
            )
        except Exception as exc:
            self._failed(temp, step, exc)
        hook = _before_commit
        if hook is not None:
            # Whatever the hook raises propagates as is and leaves the .tmp- folder behind,
            # exactly what a kill at this point leaves: list() and latest() ignore it and
            # cleanup_temp() removes it.
            hook(temp)
        try:
            self._commit(temp, final)
        except Exception as exc:
            self._failed(temp, step, exc)
        self._prune(final)
        return final

    def new_temp(self, step: int) -> Path:
        """Create the temporary folder of checkpoint ``step`` (``.tmp-...``, invisible).

        :meth:`save` creates one itself; create it first only when other writers (every
        rank's shards) must fill it before :meth:`save` (``temp=``) commits it.

        Raises:
            CheckpointError: The folder cannot be created (permissions, full disk).
        """
        _int_arg("step", step, 0)
        try:
            self._mkdir(self.directory, parents=True)
            temp = self._temp_path(self.path_for(step), "new")
            self._mkdir(temp)
        except OSError as exc:
            raise CheckpointError(
                f"cannot create a checkpoint folder in {self.directory}: {exc}; "
                f"{os_error_advice(exc)}"
            ) from exc
        return temp

    def _failed(self, temp: Path, step: int, exc: Exception) -> NoReturn:
        """Remove the temporary folder and raise: OSErrors as CheckpointError, others as is."""
        shutil.rmtree(temp, ignore_errors=True)
        os_error = find_os_error(exc)
        if os_error is not None:
            raise CheckpointError(
                f"could not write checkpoint step {step} into {self.directory}: {os_error}. "
                f"Earlier checkpoints are untouched; {os_error_advice(os_error)}, and save "
                "again"
            ) from os_error
        raise exc

    def _write(
        self,
        temp: Path,
        payload: dict[str, Any],
        *,
        step: int,
        epoch: int,
        world_size: int,
        extra: dict[str, Any],
    ) -> None:
        """Write state.pt and manifest.json into ``temp`` and sync both and the folder."""
        with self._create(temp / STATE_FILE) as f:
            writer = HashingWriter(f)
            try:
                torch.save(payload, cast(IO[bytes], writer))
            except OSError:
                raise
            except Exception as exc:
                # torch wraps an OSError of the file (a full disk) in a RuntimeError.
                os_error = writer.error or find_os_error(exc)
                if os_error is not None:
                    raise os_error from exc
                raise CheckpointError(
                    f"torch.save could not serialize the payload for step {step}: "
                    f"{type(exc).__name__}: {exc}; store state_dict()s and plain values "
                    "(see to_plain)"
                ) from exc
            f.flush()
            os.fsync(f.fileno())
        unsafe = _unsafe_globals(temp / STATE_FILE)
        if unsafe:
            raise CheckpointError(
                f"the payload for step {step} holds objects that torch.load(weights_only=True) "
                f"refuses: {', '.join(unsafe)}; it could be saved but never resumed. Store "
                "state_dict()s, tensors, numbers and strings instead (to_plain() converts "
                "NumPy values, enums, namedtuples, dataclasses and paths)"
            )
        shards = self._record_shards(temp)
        version = FORMAT_VERSION if shards is not None else manifests.SINGLE_FILE_FORMAT
        manifest: dict[str, Any] = {
            "format_version": version,
            "step": step,
            "epoch": epoch,
            "world_size": world_size,
            "torch_version": str(torch.__version__),
            "devlayer_version": devlayer.__version__,
            "created": datetime.now(timezone.utc).isoformat(),
            "sha256": writer.sha256.hexdigest(),
            "size": writer.size,
            "run_id": self.run_id,
            "extra": extra,
        }
        if shards is not None:
            manifest["shards"] = shards
        manifest["manifest_sha256"] = manifests.digest(manifest)
        with self._create(temp / MANIFEST_FILE) as f:
            f.write((json.dumps(manifest, indent=2, allow_nan=False) + "\n").encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(temp)

    def _record_shards(self, temp: Path) -> dict[str, dict[str, Any]] | None:
        """Size and sha256 of each file in ``temp/shards`` (``None``: no shards folder)."""
        folder = temp / SHARDS_DIR
        if not folder.is_dir():
            return None
        shards: dict[str, dict[str, Any]] = {}
        for path in sorted(folder.iterdir()):
            if not manifests.SHARD_NAME.fullmatch(path.name):
                raise CheckpointError(
                    f"{path} is not a shard file name devlayer records; write only DCP's "
                    f"files into {folder}"
                )
            size, digest = sha256_file(path, 1 << 62, f"remove {path}")
            shards[path.name] = {"size": size, "sha256": digest}
        fsync_dir(folder)
        return shards

    def _create(self, path: Path) -> IO[bytes]:
        """A new file for writing (``0600`` for a private store, else as the umask says)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if self.private else 0o666)
        return os.fdopen(fd, "wb")

    def _commit(self, temp: Path, final: Path) -> None:
        aside: Path | None = None
        if final.exists() or final.is_symlink():
            # Same step saved again: move the old one out of the final name first, so that
            # the rename below never meets a non-empty folder.
            aside = self._temp_path(final, "old")
            os.replace(final, aside)
        try:
            os.replace(temp, final)
        except OSError:
            if aside is not None:
                os.replace(aside, final)
            raise
        try:
            fsync_dir(self.directory)
        except OSError as exc:
            raise CheckpointError(
                f"{final} was renamed into place but {self.directory} could not be synced "
                f"({exc}); the checkpoint may not survive a power loss, check the disk"
            ) from exc
        if aside is not None:
            with contextlib.suppress(OSError):
                remove_path(aside)  # a symlinked step folder: the link only

    def _counts(self, path: Path) -> bool:
        """Whether ``path`` is a checkpoint that pruning may rank: its manifest reads and
        names the step of the folder's name (a renamed folder must not push real steps out).
        """
        try:
            manifests.read(path)
        except CheckpointError:
            return False
        return True

    def _prune(self, just_saved: Path) -> None:
        others = [p for p in self.list() if p != just_saved]
        suspect = [p for p in others if not self._counts(p)]
        if suspect:
            warnings.warn(
                f"left {', '.join(map(str, suspect))} alone when pruning {self.directory}: "
                "its manifest is unreadable or names another step than the folder; check "
                "it and delete it by hand",
                CheckpointWarning,
                stacklevel=3,
            )
        others = [p for p in others if p not in suspect]
        doomed = others[: max(0, len(others) - (self.keep - 1))]
        for path in doomed:
            # Rename first: an interrupted delete leaves a .tmp- folder, never a half
            # checkpoint under a final name. A symlinked step folder loses the link only.
            gone = self._temp_path(path, "del")
            try:
                os.replace(path, gone)
                remove_path(gone)
            except OSError as exc:
                warnings.warn(
                    f"could not delete old checkpoint {path} (keep={self.keep}): {exc}; "
                    "delete it by hand or call cleanup_temp()",
                    CheckpointWarning,
                    stacklevel=3,
                )

    def cleanup_temp(self) -> list[Path]:
        """Remove what interrupted saves left behind; returns the removed paths.

        Removes this store's ``.tmp-<prefix>-*`` entries: folders of saves that crashed
        before their rename and of deletes that were interrupted. If a crash hit between
        moving an old copy of a step aside and renaming its replacement into place, the old
        copy is renamed back instead (with a :class:`CheckpointWarning`).

        Only entries whose writer cannot still be writing are touched: this process's own,
        those of processes on this host that have exited, and, while this store holds the
        folder lock (:meth:`lock`; taken for the call when free), those of other hosts. An
        entry of a live process on this host is never removed. Temporary names carry the
        writer's pid and a host tag for this.

        Raises:
            CheckpointError: An entry could not be removed (the message names it).

        Example:
            >>> import tempfile
            >>> store = CheckpointStore(tempfile.mkdtemp())
            >>> (store.directory / ".tmp-step-000000007.new.999999999.ab").mkdir()
            >>> [p.name for p in store.cleanup_temp()], store.list()
            (['.tmp-step-000000007.new.999999999.ab'], [])
        """
        if not self.directory.is_dir():
            return []
        took = False
        if not self.locked:
            try:
                self.acquire_lock()
                took = True
            except CheckpointError:
                pass  # held elsewhere (or unwritable): only provably dead writers' entries
        try:
            return self._cleanup_temp(self.locked)
        finally:
            if took:
                self.release_lock()

    def _owner_gone(self, writer: str, locked: bool) -> bool:
        """Whether the writer named in a temporary name (``<pid>.<host>.<hex>``) is done."""
        parts = writer.split(".")
        pid = int(parts[0]) if parts[0].isdigit() else -1
        host = parts[1] if len(parts) >= 3 else None  # older names: <pid>.<hex>, no host
        here = host == host_tag()
        if here and pid == os.getpid():
            return True
        if (here or host is None) and pid_alive(pid):
            return False  # a live process here may be writing it right now
        return here or locked

    def _cleanup_temp(self, locked: bool) -> list[Path]:
        removed: list[Path] = []
        failed: list[str] = []
        for path in self._scan(self._temp_name):
            m = self._temp_name.fullmatch(path.name)
            if m is None or not self._owner_gone(m.group(3), locked):
                continue
            final = self.path_for(int(m.group(1)))
            try:
                if m.group(2) == "old" and not (final.exists() or final.is_symlink()):
                    os.replace(path, final)
                    warnings.warn(
                        f"restored {final} from {path.name}: a save of the same step was "
                        "interrupted before its replacement was in place",
                        CheckpointWarning,
                        stacklevel=3,
                    )
                    continue
                remove_path(path)
                removed.append(path)
            except OSError as exc:
                failed.append(f"{path} ({exc})")
        if failed:
            raise CheckpointError(
                f"could not remove leftovers of interrupted saves: {'; '.join(failed)}; "
                "check permissions, or delete them by hand"
            )
        if removed:
            fsync_dir(self.directory)
        return removed

    # -- reading -------------------------------------------------------------------------

    def _scan(self, pattern: re.Pattern[str]) -> Iterator[Path]:
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return
        except OSError as exc:
            raise CheckpointError(f"cannot list {self.directory}: {exc}") from exc
        for entry in entries:
            if pattern.fullmatch(entry.name):
                yield Path(entry.path)

    def list(self) -> list[Path]:
        """Checkpoint folders, oldest step first (temporary ``.tmp-*`` folders excluded).

        Folders are listed by name; they are not verified here (see :meth:`latest`).

        Example:
            >>> import tempfile
            >>> store = CheckpointStore(tempfile.mkdtemp(), keep=5)
            >>> for step in (20, 3, 100):
            ...     _ = store.save({}, step=step, epoch=0, world_size=1)
            >>> [p.name for p in store.list()]
            ['step-000000003', 'step-000000020', 'step-000000100']
        """
        found = [p for p in self._scan(self._name) if p.is_dir()]
        return sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[1]))

    def verify(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Check one checkpoint without loading it; returns its manifest.

        Checks that ``manifest.json`` is readable JSON with the expected fields and a known
        ``format_version``, and that ``state.pt`` has the recorded size and sha256 (a single
        changed byte is caught).

        Args:
            path: A checkpoint folder or its ``state.pt``.

        Returns:
            The manifest (a dict).

        Raises:
            CheckpointCorruptError: Missing, empty, truncated or garbled manifest or state,
                or a sha256 mismatch.
            CheckpointVersionError: ``format_version`` is newer than :data:`FORMAT_VERSION`.
            CheckpointError: ``path`` is not a folder, or cannot be read.

        Example:
            >>> import tempfile
            >>> store = CheckpointStore(tempfile.mkdtemp())
            >>> p = store.save({"a": 1}, step=1, epoch=0, world_size=2)
            >>> store.verify(p)["world_size"]
            2
        """
        return manifests.verify(checkpoint_folder(path))

    def latest_verified(
        self, on_skip: Callable[[Path, CheckpointError], None] | None
    ) -> tuple[Path, dict[str, Any]] | None:
        candidates = self.list()
        if not candidates:
            return None
        runs = self.runs()
        if len(runs) > 1:
            raise CheckpointRunError(
                f"{self.directory} holds checkpoints of {len(runs)} runs ({describe_runs(runs)}); "
                "resuming would continue one of them on a guess. Move the other run's "
                "folders away (or delete them), or load one checkpoint by its path"
            )
        skip = _warn_skip if on_skip is None else on_skip
        failures: list[tuple[Path, CheckpointError]] = []
        for path in reversed(candidates):
            try:
                return path, manifests.verify(path)
            except CheckpointError as exc:
                failures.append((path, exc))
                skip(path, exc)
        listing = "\n".join(f"  {p}: {e}" for p, e in failures)
        cls: type[CheckpointError] = (
            CheckpointVersionError
            if all(isinstance(e, CheckpointVersionError) for _, e in failures)
            else CheckpointCorruptError
        )
        raise cls(
            f"none of the {len(failures)} checkpoints in {self.directory} can be used:\n"
            f"{listing}\nRefusing to start from scratch: fix or remove them (or point the "
            "run at another directory) and start again"
        )

    def runs(self) -> dict[str, _Steps]:
        """The run ids recorded in this store's checkpoints, each with its steps.

        Reads only the manifests (checkpoints whose manifest is unreadable, and those of
        format 1 without a run id, are left out).

        Example:
            >>> import tempfile
            >>> store = CheckpointStore(tempfile.mkdtemp(), run_id="a")
            >>> _ = store.save({}, step=1, epoch=0, world_size=1)
            >>> store.runs()
            {'a': [1]}
        """
        found: dict[str, _Steps] = {}
        for path in self.list():
            try:
                manifest = manifests.read(path)
            except CheckpointError:
                continue
            if manifest.get("run_id") is not None:
                found.setdefault(manifest["run_id"], []).append(manifest["step"])
        return found

    def latest(
        self, *, on_skip: Callable[[Path, CheckpointError], None] | None = None
    ) -> Path | None:
        """The newest checkpoint that verifies, or ``None`` when there is none at all.

        Checkpoints that fail :meth:`verify` are skipped, newest first; each skip is reported
        to ``on_skip`` (default: a :class:`CheckpointWarning` naming the path and reason).

        Args:
            on_skip: Called as ``on_skip(path, error)`` for each skipped checkpoint.

        Returns:
            The folder, or ``None`` if the directory holds no checkpoint (a fresh run).

        Raises:
            CheckpointCorruptError: Checkpoints exist but none verifies (they are listed);
                devlayer never silently starts from scratch. ``CheckpointVersionError``
                instead when all of them are from a newer format.
            CheckpointRunError: The manifests name more than one ``run_id``: resuming
                would guess which run to continue.

        Example:
            >>> import tempfile
            >>> store = CheckpointStore(tempfile.mkdtemp())
            >>> store.latest() is None
            True
            >>> _ = store.save({}, step=1, epoch=0, world_size=1)
            >>> store.latest().name
            'step-000000001'
        """
        found = self.latest_verified(on_skip)
        return None if found is None else found[0]

    def load(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        map_location: MapLocation = "cpu",
        expected_world_size: int | None = None,
        allow_world_size_change: bool = False,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Verify and load a checkpoint; returns ``(payload, manifest)``.

        ``state.pt`` is read with ``torch.load(..., weights_only=True)`` only: tensors,
        numbers, strings, ``None`` and containers load; anything that would need to run code
        (an arbitrary pickled object) is refused.

        Args:
            path: A checkpoint folder or its ``state.pt``; default :meth:`latest`.
            map_location: Passed to ``torch.load`` (default ``"cpu"``; e.g.
                ``devlayer.device()`` to load straight onto this rank's device).
            expected_world_size: This run's world size; compared with the saved one.
            allow_world_size_change: Load even if the world sizes differ (model and
                optimizer state are the same on every DDP rank; per-rank state such as RNG
                streams then needs care, see docs/checkpoints.md).

        Returns:
            The payload dict and the manifest dict.

        Raises:
            CheckpointError: No checkpoint (``path=None`` on an empty store), or
                ``torch.load`` failed for another reason (e.g. a device in ``map_location``
                that this machine lacks).
            CheckpointCorruptError: Verification failed, or the file holds objects that
                ``weights_only`` loading refuses.
            CheckpointVersionError: Written by a newer devlayer.
            CheckpointWorldSizeError: World sizes differ and the change is not allowed.

        Example:
            >>> import tempfile, torch
            >>> store = CheckpointStore(tempfile.mkdtemp())
            >>> _ = store.save({"t": torch.arange(3)}, step=3, epoch=0, world_size=2)
            >>> store.load(expected_world_size=1)
            Traceback (most recent call last):
            ...
            devlayer.train.errors.CheckpointWorldSizeError: ...
            >>> payload, _ = store.load(expected_world_size=1, allow_world_size_change=True)
            >>> payload["t"].tolist()
            [0, 1, 2]
        """
        if expected_world_size is not None:
            _int_arg("expected_world_size", expected_world_size, 1)
        if path is None:
            found = self.latest_verified(None)
            if found is None:
                raise CheckpointError(
                    f"no checkpoint to load in {self.directory} (looked for "
                    f"{self.prefix}-<step> folders); call latest() first, which returns None "
                    "on a fresh run, or pass the path of a checkpoint"
                )
            folder, manifest = found
        else:
            folder = checkpoint_folder(path)
            manifest = manifests.verify(folder)
        saved = manifest["world_size"]
        if (
            expected_world_size is not None
            and saved != expected_world_size
            and not allow_world_size_change
        ):
            raise CheckpointWorldSizeError(
                f"{folder} was saved with world_size={saved}, this run has world_size="
                f"{expected_world_size}; per-rank state (RNG streams, data position) would not "
                f"line up. Start {saved} ranks, or pass allow_world_size_change=True to load "
                "it anyway"
            )
        payload = _load_state(folder / STATE_FILE, map_location)
        if not isinstance(payload, dict):
            raise CheckpointCorruptError(
                f"{folder / STATE_FILE} holds a {type(payload).__name__}, expected the dict "
                "that CheckpointStore.save writes; it was not written by devlayer"
            )
        return payload, manifest
