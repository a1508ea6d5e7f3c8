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
and share the outcome (see ``docs/checkpoints.md``).

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

import collections
import dataclasses
import enum
import errno
import hashlib
import json
import os
import pickle
import random
import re
import secrets
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path, PurePath
from types import ModuleType
from typing import IO, TYPE_CHECKING, Any, NoReturn, cast

import torch

import devlayer
from devlayer.errors import DevlayerError, InvalidArgumentError

if TYPE_CHECKING:
    from torch.serialization import MAP_LOCATION as MapLocation

__all__ = [
    "FORMAT_VERSION",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointStore",
    "CheckpointVersionError",
    "CheckpointWarning",
    "CheckpointWorldSizeError",
    "rng_state",
    "set_rng_state",
    "to_plain",
]

#: Version of the on-disk layout. A reader refuses manifests with a higher number.
FORMAT_VERSION = 1
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
#: Every name that starts with this is work in progress (or left by a crash) and never a
#: checkpoint: list() and latest() skip it, cleanup_temp() removes it.
TEMP_PREFIX = ".tmp-"

#: Test hook: called with the temporary folder after it is completely written and synced,
#: just before it is renamed into place. Tests raise from it to simulate a crash there.
_before_commit: Callable[[Path], None] | None = None


_REQUIRED_FIELDS: dict[str, int] = {"step": 0, "epoch": 0, "world_size": 1, "size": 0}
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_CHUNK = 1 << 20
# fsync on a directory is not supported by every file system (some network and FUSE file
# systems answer EINVAL); that is not a failed write, so those answers are ignored.
_DIR_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


class CheckpointError(DevlayerError):
    """A checkpoint could not be written, found or read; the message names the path."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint is incomplete, damaged, or holds objects that would run code on load."""


class CheckpointVersionError(CheckpointError):
    """A checkpoint was written in a newer format than this devlayer reads."""


class CheckpointWorldSizeError(CheckpointError):
    """A checkpoint was saved with a different number of ranks than this run has."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped or only partly restored; the message says which and why."""


def _int_arg(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(
            f"{name}={value!r} ({type(value).__name__}) is not an integer; pass an int >= {minimum}"
        )
    if value < minimum:
        raise InvalidArgumentError(f"{name}={value} is out of range; pass an int >= {minimum}")
    return value


def _fsync_dir(path: Path) -> None:
    """Make a rename or new entry in ``path`` durable (POSIX only)."""
    if os.name != "posix":  # Windows cannot open a directory for fsync
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


class _HashingWriter:
    """File-like object for torch.save that hashes what it writes.

    Writing through Python (rather than handing torch a path) also makes a full disk an
    ``OSError(ENOSPC)`` instead of torch's generic ``RuntimeError`` from its C++ writer.
    """

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += memoryview(data).nbytes  # torch hands over memoryviews
        return self._file.write(data)

    def flush(self) -> None:
        self._file.flush()


def _sha256_file(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


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


def _resolve(path: str | os.PathLike[str]) -> Path:
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


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST_FILE
    fix = (
        f"delete {folder} (resume then uses the newest checkpoint that verifies) "
        "or restore it from a copy"
    )
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointCorruptError(
            f"{path} is missing: the checkpoint is incomplete or was changed by hand; {fix}"
        ) from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}; check permissions and mounts") from exc
    if not raw:
        raise CheckpointCorruptError(f"{path} is empty (0 bytes), expected JSON; {fix}")
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointCorruptError(
            f"{path} is not valid JSON ({len(raw)} bytes: {exc}); {fix}"
        ) from exc
    if not isinstance(manifest, dict):
        raise CheckpointCorruptError(
            f"{path} holds a JSON {type(manifest).__name__}, expected an object; {fix}"
        )
    version = manifest.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointCorruptError(
            f"{path} has format_version={version!r}, expected an integer from 1 to "
            f"{FORMAT_VERSION}; {fix}"
        )
    if version > FORMAT_VERSION:
        raise CheckpointVersionError(
            f"{folder} was written by a newer devlayer "
            f"({manifest.get('devlayer_version', 'unknown version')}, format {version}); "
            f"this devlayer {devlayer.__version__} reads formats up to {FORMAT_VERSION}: "
            "upgrade devlayer (pip install -U devlayer) to load it"
        )
    bad = [
        f"{key}={manifest.get(key, '<missing>')!r}"
        for key, minimum in _REQUIRED_FIELDS.items()
        if isinstance(manifest.get(key), bool)
        or not isinstance(manifest.get(key), int)
        or manifest[key] < minimum
    ]
    sha = manifest.get("sha256")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        bad.append(f"sha256={sha!r}")
    if bad:
        raise CheckpointCorruptError(
            f"{path} has missing or invalid fields: {', '.join(bad)} (expected integers "
            f"step >= 0, epoch >= 0, world_size >= 1, size >= 0 and a 64-digit hex sha256); {fix}"
        )
    return manifest


def _verify(folder: Path) -> dict[str, Any]:
    manifest = _read_manifest(folder)
    state = folder / STATE_FILE
    fix = f"delete {folder} (resume then uses the newest checkpoint that verifies)"
    try:
        size = state.stat().st_size
    except FileNotFoundError:
        raise CheckpointCorruptError(
            f"{state} is missing (the manifest expects {manifest['size']} bytes); {fix}"
        ) from None
    if size != manifest["size"]:
        what = "is empty (0 bytes)" if size == 0 else f"has {size} bytes"
        raise CheckpointCorruptError(
            f"{state} {what}, the manifest says {manifest['size']}: the file is truncated "
            f"or was replaced; {fix}"
        )
    try:
        _, digest = _sha256_file(state)
    except OSError as exc:
        raise CheckpointError(f"cannot read {state}: {exc}; check permissions and mounts") from exc
    if digest != manifest["sha256"]:
        raise CheckpointCorruptError(
            f"{state} has sha256 {digest}, the manifest says {manifest['sha256']}: the file "
            f"was damaged or modified after it was written; {fix}"
        )
    return manifest


def _load_state(state: Path, map_location: MapLocation) -> Any:
    # weights_only=True only, never a fallback to full pickle and no extra safe globals:
    # a checkpoint is data, and loading one must not run code from it.
    try:
        return torch.load(state, map_location=map_location, weights_only=True)
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

    Raises:
        InvalidArgumentError: ``keep`` below 1 or not an int, or an unusable ``prefix``.

    Example:
        >>> import tempfile, torch
        >>> store = CheckpointStore(tempfile.mkdtemp(), keep=1)
        >>> for step in (1, 2):
        ...     _ = store.save({"step": step}, step=step, epoch=0, world_size=1)
        >>> [p.name for p in store.list()]
        ['step-000000002']
    """

    def __init__(
        self, directory: str | os.PathLike[str], *, keep: int = 2, prefix: str = "step"
    ) -> None:
        self.keep = _int_arg("keep", keep, 1)
        if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
            raise InvalidArgumentError(
                f"prefix={prefix!r} cannot name checkpoint folders; use letters, digits, "
                "'_', '.' and '-', not starting with '.' or '-' (e.g. 'step')"
            )
        self.directory = Path(directory)
        self.prefix = prefix
        self._name = re.compile(rf"{re.escape(prefix)}-(\d+)")
        self._temp_name = re.compile(rf"{re.escape(TEMP_PREFIX + prefix)}-(\d+)\.(new|old|del)\..+")

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
        return (
            self.directory
            / f"{TEMP_PREFIX}{final.name}.{kind}.{os.getpid()}.{secrets.token_hex(4)}"
        )

    # -- writing -------------------------------------------------------------------------

    def save(
        self,
        payload: Mapping[str, Any],
        *,
        step: int,
        epoch: int,
        world_size: int,
        extra: Mapping[str, Any] | None = None,
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
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            temp = self._temp_path(final, "new")
            temp.mkdir()
        except OSError as exc:
            raise CheckpointError(
                f"cannot create a checkpoint folder in {self.directory}: {exc}; check that "
                "the directory is writable and the disk is not full"
            ) from exc
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

    def _failed(self, temp: Path, step: int, exc: Exception) -> NoReturn:
        """Remove the temporary folder and raise: OSErrors as CheckpointError, others as is."""
        shutil.rmtree(temp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise CheckpointError(
                f"could not write checkpoint step {step} into {self.directory}: {exc}. "
                "Earlier checkpoints are untouched; free disk space or fix permissions "
                "and save again"
            ) from exc
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
        with open(temp / STATE_FILE, "wb") as f:
            writer = _HashingWriter(f)
            try:
                torch.save(payload, cast(IO[bytes], writer))
            except OSError:
                raise
            except Exception as exc:
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
        manifest: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "epoch": epoch,
            "world_size": world_size,
            "torch_version": str(torch.__version__),
            "devlayer_version": devlayer.__version__,
            "created": datetime.now(timezone.utc).isoformat(),
            "sha256": writer.sha256.hexdigest(),
            "size": writer.size,
            "extra": extra,
        }
        with open(temp / MANIFEST_FILE, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(temp)

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
            _fsync_dir(self.directory)
        except OSError as exc:
            raise CheckpointError(
                f"{final} was renamed into place but {self.directory} could not be synced "
                f"({exc}); the checkpoint may not survive a power loss, check the disk"
            ) from exc
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)

    def _prune(self, just_saved: Path) -> None:
        others = [p for p in self.list() if p != just_saved]
        doomed = others[: max(0, len(others) - (self.keep - 1))]
        for path in doomed:
            # Rename first: an interrupted delete leaves a .tmp- folder, never a half
            # checkpoint under a final name.
            gone = self._temp_path(path, "del")
            try:
                os.replace(path, gone)
                shutil.rmtree(gone)
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
        copy is renamed back instead (with a :class:`CheckpointWarning`). Call it when no
        other process is saving into the directory, e.g. on rank 0 before
        :meth:`latest` at start-up.

        Raises:
            CheckpointError: An entry could not be removed (the message names it).

        Example:
            >>> import tempfile
            >>> store = CheckpointStore(tempfile.mkdtemp())
            >>> (store.directory / ".tmp-step-000000007.new.123.ab").mkdir()
            >>> [p.name for p in store.cleanup_temp()], store.list()
            (['.tmp-step-000000007.new.123.ab'], [])
        """
        removed: list[Path] = []
        failed: list[str] = []
        for path in self._scan(self._temp_name):
            m = self._temp_name.fullmatch(path.name)
            if m is None:  # _scan matched it; keeps mypy informed
                continue
            final = self.path_for(int(m.group(1)))
            try:
                if m.group(2) == "old" and not final.exists():
                    os.replace(path, final)
                    warnings.warn(
                        f"restored {final} from {path.name}: a save of the same step was "
                        "interrupted before its replacement was in place",
                        CheckpointWarning,
                        stacklevel=2,
                    )
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                removed.append(path)
            except OSError as exc:
                failed.append(f"{path} ({exc})")
        if failed:
            raise CheckpointError(
                f"could not remove leftovers of interrupted saves: {'; '.join(failed)}; "
                "check permissions, or delete them by hand"
            )
        if removed:
            _fsync_dir(self.directory)
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
        return _verify(_resolve(path))

    def _latest(
        self, on_skip: Callable[[Path, CheckpointError], None] | None
    ) -> tuple[Path, dict[str, Any]] | None:
        candidates = self.list()
        if not candidates:
            return None
        skip = _warn_skip if on_skip is None else on_skip
        failures: list[tuple[Path, CheckpointError]] = []
        for path in reversed(candidates):
            try:
                return path, _verify(path)
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

        Example:
            >>> import tempfile
            >>> store = CheckpointStore(tempfile.mkdtemp())
            >>> store.latest() is None
            True
            >>> _ = store.save({}, step=1, epoch=0, world_size=1)
            >>> store.latest().name
            'step-000000001'
        """
        found = self._latest(on_skip)
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
            devlayer.train.checkpoint.CheckpointWorldSizeError: ...
            >>> payload, _ = store.load(expected_world_size=1, allow_world_size_change=True)
            >>> payload["t"].tolist()
            [0, 1, 2]
        """
        if expected_world_size is not None:
            _int_arg("expected_world_size", expected_world_size, 1)
        if path is None:
            found = self._latest(None)
            if found is None:
                raise CheckpointError(
                    f"no checkpoint to load in {self.directory} (looked for "
                    f"{self.prefix}-<step> folders); call latest() first, which returns None "
                    "on a fresh run, or pass the path of a checkpoint"
                )
            folder, manifest = found
        else:
            folder = _resolve(path)
            manifest = _verify(folder)
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


# -- random number generators ------------------------------------------------------------


def _numpy() -> ModuleType | None:
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def _accelerator() -> torch.device | None:
    """This rank's accelerator when devlayer runs on one, else None."""
    if not devlayer.is_initialized():
        return None
    dev = devlayer.device()
    return None if dev.type == "cpu" else dev


def rng_state() -> dict[str, Any]:
    """Capture the random number generators of this process.

    Python's ``random``, NumPy's global generator (when NumPy is installed), torch's CPU
    generator and, when devlayer is initialized on an accelerator, that device's generator
    (through ``torch.get_device_module``). The result holds only tensors, ints, floats,
    strings, ``None``, tuples, lists and dicts, so it saves and loads with
    ``weights_only=True``.

    Returns:
        ``{"python": ..., "torch": ByteTensor, "numpy": {...}, "device": {...}}`` (the last
        two only when available).

    Example:
        >>> import torch
        >>> state = rng_state()
        >>> a = torch.rand(3)
        >>> set_rng_state(state)
        >>> torch.equal(torch.rand(3), a)
        True
    """
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": (version, tuple(internal), gauss),
        "torch": torch.get_rng_state(),
    }
    np = _numpy()
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state["numpy"] = {
            "bit_generator": str(name),
            "keys": [int(k) for k in keys],  # an ndarray would need a numpy safe global
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    dev = _accelerator()
    if dev is not None:
        module = torch.get_device_module(dev.type)
        if hasattr(module, "get_rng_state"):
            state["device"] = {"type": dev.type, "state": module.get_rng_state(dev).cpu()}
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore generators captured by :func:`rng_state`.

    Parts that are missing are left alone. An accelerator state is restored only on the same
    device type; otherwise (e.g. resuming a GPU run on CPU) it is skipped with a
    :class:`CheckpointWarning`, as is a NumPy state when NumPy is not installed.

    Args:
        state: The dict from :func:`rng_state` (also after a save / load round trip, with
            tensors on any device).

    Raises:
        InvalidArgumentError: ``state`` is not a mapping.

    Example:
        >>> import random
        >>> s = rng_state(); x = random.random(); set_rng_state(s)
        >>> random.random() == x
        True
    """
    if not isinstance(state, Mapping):
        raise InvalidArgumentError(
            f"state is a {type(state).__name__}, expected the dict returned by rng_state()"
        )
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    if "numpy" in state:
        np = _numpy()
        if np is None:
            warnings.warn(
                "the RNG state holds a NumPy state but NumPy is not installed; skipped it",
                CheckpointWarning,
                stacklevel=2,
            )
        else:
            s = state["numpy"]
            np.random.set_state(
                (
                    s["bit_generator"],
                    np.asarray(s["keys"], dtype=np.uint32),
                    int(s["pos"]),
                    int(s["has_gauss"]),
                    float(s["cached_gaussian"]),
                )
            )
    if "device" in state:
        saved = state["device"]
        dev = _accelerator()
        if dev is None or dev.type != saved["type"]:
            here = "cpu" if dev is None else dev.type
            warnings.warn(
                f"the RNG state was saved on a {saved['type']} device and this process runs "
                f"on {here}; the device generator was not restored (the run stays valid but "
                "its random numbers differ from an uninterrupted run)",
                CheckpointWarning,
                stacklevel=2,
            )
        else:
            module = torch.get_device_module(dev.type)
            module.set_rng_state(torch.as_tensor(saved["state"], dtype=torch.uint8).cpu(), dev)


# -- plain values ---------------------------------------------------------------------------


def to_plain(obj: Any) -> Any:
    """A copy of ``obj`` made only of what ``torch.load(weights_only=True)`` accepts.

    Tensors, ``torch.Size`` / dtype / device, ``None``, bools, ints, floats, complex, str and
    bytes are kept; dicts (``OrderedDict`` kept, with a state_dict's ``_metadata``), lists,
    tuples and sets are converted element by element. Converted: enums to their value, NumPy
    scalars to Python numbers and arrays to tensors (object arrays to lists), namedtuples to
    tuples, dataclass instances to dicts, paths to strings. ``state_dict()`` results of
    modules, optimizers, LR schedulers and ``GradScaler`` are already plain.

    Args:
        obj: The value to convert.

    Returns:
        The converted value (tensors are not copied).

    Raises:
        InvalidArgumentError: A value of another type; the message names where it is.

    Example:
        >>> import enum
        >>> class Phase(enum.Enum):
        ...     TRAIN = "train"
        >>> to_plain({"phase": Phase.TRAIN, "sizes": (1, 2)})
        {'phase': 'train', 'sizes': (1, 2)}
    """
    return _plain(obj, "obj")


_ATOMS = (type(None), bool, int, float, complex, str, bytes)


def _plain(obj: Any, where: str) -> Any:
    if type(obj) in _ATOMS or isinstance(
        obj, (torch.Tensor, torch.Size, torch.dtype, torch.device)
    ):
        return obj
    if isinstance(obj, enum.Enum):
        return _plain(obj.value, where)
    np = _numpy()
    if np is not None:
        if isinstance(obj, np.generic):
            return _plain(obj.item(), where)
        if isinstance(obj, np.ndarray):
            if obj.dtype == object:
                return _plain(obj.tolist(), where)
            return torch.from_numpy(np.array(obj, copy=True))
    # Subclasses of int / float / str (other than enums) pickle as their own class.
    if isinstance(obj, int):  # bool is covered: no class can subclass it
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, complex):
        return complex(obj)
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, bytes):
        return bytes(obj)
    if isinstance(obj, Mapping):
        out: dict[Any, Any] = (
            collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
        )
        for key, value in obj.items():
            out[_plain(key, f"{where} key")] = _plain(value, f"{where}[{key!r}]")
        metadata = getattr(obj, "_metadata", None)  # state_dict version info
        if isinstance(out, collections.OrderedDict) and isinstance(metadata, Mapping):
            out._metadata = _plain(metadata, f"{where}._metadata")  # type: ignore[attr-defined]
        return out
    if isinstance(obj, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, (set, frozenset)):
        return {_plain(v, f"{where} item") for v in obj}
    if isinstance(obj, PurePath):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: _plain(getattr(obj, f.name), f"{where}.{f.name}")
            for f in dataclasses.fields(obj)
        }
    raise InvalidArgumentError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which "
        "torch.load(weights_only=True) refuses; store its state_dict() or convert it to "
        "tensors, numbers, strings, lists and dicts"
    )
