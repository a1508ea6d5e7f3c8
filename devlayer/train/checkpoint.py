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
import errno
import hashlib
import json
import os
import pickle
import re
import secrets
import shutil
import signal
import socket
import stat
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NoReturn, cast

import torch

import devlayer
from devlayer.errors import DevlayerError, InvalidArgumentError
from devlayer.train.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointInUseError,
    CheckpointRunError,
    CheckpointVersionError,
    CheckpointWarning,
    CheckpointWorldSizeError,
    PreemptedError,
)
from devlayer.train.plain import to_plain
from devlayer.train.rng import rng_state, set_rng_state
from devlayer.train.signals import on_sigterm

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
    "TrainingCheckpoints",
    "model_state_mismatch",
    "rng_state",
    "set_rng_state",
    "to_plain",
]

#: Version of the on-disk layout. A reader refuses manifests with a higher number.
#: 2 added ``run_id`` and ``manifest_sha256`` (a checksum of the manifest itself); format 1
#: manifests (no checksum) are still read.
FORMAT_VERSION = 2
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
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
_CHUNK = 1 << 20
#: Largest manifest.json read; real ones are under 1 KiB.
MANIFEST_LIMIT = 1 << 20
#: Name of the lock file of a store, in its directory: ``.lock-<prefix>``.
LOCK_PREFIX = ".lock-"
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}
_NO_PERMISSION = {errno.EACCES, errno.EPERM, errno.EROFS}
_LOCKS_UNSUPPORTED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}
# fsync on a directory is not supported by every file system (some network and FUSE file
# systems answer EINVAL); that is not a failed write, so those answers are ignored.
_DIR_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


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

    torch wraps an ``OSError`` raised by ``write`` into its own ``RuntimeError``; the
    writer keeps the original in :attr:`error`, so a full disk is reported as such.
    """

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += memoryview(data).nbytes  # torch hands over memoryviews
        try:
            return self._file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        try:
            self._file.flush()
        except OSError as exc:
            self.error = exc
            raise


def _os_error(exc: BaseException | None) -> OSError | None:
    """The first ``OSError`` in ``exc``'s chain (torch wraps it in a RuntimeError)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _os_error_advice(exc: OSError) -> str:
    """What to do about an OSError while writing, by its errno."""
    if exc.errno in _DISK_FULL:
        return "the disk is full (or over quota): free disk space or use another directory"
    if exc.errno in _NO_PERMISSION:
        return "the directory is not writable: fix its permissions or mount, or use another one"
    return "check the disk and the directory"


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _open_regular(path: Path, fix: str) -> int:
    """Open ``path`` for reading only if it is a regular file (never blocks on a FIFO).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointCorruptError: ``path`` is a FIFO, device, socket or directory.
        CheckpointError: Another OS error.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}; check permissions and mounts") from exc
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise CheckpointCorruptError(
            f"{path} is {_kind(mode)}, expected a regular file (devlayer reads only regular "
            f"files, so a pipe or a device cannot block or flood a resume); {fix}"
        )
    return fd


def _read_regular(path: Path, limit: int, fix: str) -> bytes:
    """The bytes of the regular file ``path``, refused when larger than ``limit``."""
    fd = _open_regular(path, fix)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(limit + 1)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}; check permissions and mounts") from exc
    finally:
        os.close(fd)
    if len(raw) > limit:
        raise CheckpointCorruptError(
            f"{path} is larger than {limit} bytes, expected a small JSON file; {fix}"
        )
    return raw


def _sha256_file(path: Path, limit: int, fix: str) -> tuple[int, str]:
    """Size and sha256 of the regular file ``path``, reading at most ``limit + 1`` bytes."""
    digest = hashlib.sha256()
    size = 0
    fd = _open_regular(path, fix)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            while size <= limit and (chunk := f.read(min(_CHUNK, limit + 1 - size))):
                digest.update(chunk)
                size += len(chunk)
    finally:
        os.close(fd)
    return size, digest.hexdigest()


def _manifest_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 of the manifest's own content (every field but ``manifest_sha256``)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _host_tag() -> str:
    """8 hex digits naming this host in temporary names (host names may hold dots)."""
    return hashlib.sha256(socket.gethostname().encode("utf-8")).hexdigest()[:8]


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (zombies count as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, owned by someone else
        return True
    return True


def _remove(path: Path) -> None:
    """Remove a file, a symlink (never what it points to) or a real folder tree."""
    if path.is_symlink() or not path.is_dir():
        path.unlink()
    else:
        shutil.rmtree(path)


def _folder_step(folder: Path) -> int | None:
    """The step a folder's name claims (``...-<digits>``), or None for another name."""
    head, sep, digits = folder.name.rpartition("-")
    return int(digits) if sep and head and digits.isdigit() else None


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
        raw = _read_regular(path, MANIFEST_LIMIT, fix)
    except FileNotFoundError:
        raise CheckpointCorruptError(
            f"{path} is missing: the checkpoint is incomplete or was changed by hand; {fix}"
        ) from None
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
    run_id = manifest.get("run_id")
    if run_id is not None and not (isinstance(run_id, str) and _RUN_ID.fullmatch(run_id)):
        bad.append(f"run_id={run_id!r}")
    if bad:
        raise CheckpointCorruptError(
            f"{path} has missing or invalid fields: {', '.join(bad)} (expected integers "
            f"step >= 0, epoch >= 0, world_size >= 1, size >= 0, a 64-digit hex sha256 and "
            f"a run_id string or null); {fix}"
        )
    if version >= 2:
        recorded, actual = manifest.get("manifest_sha256"), _manifest_digest(manifest)
        if recorded != actual:
            raise CheckpointCorruptError(
                f"{path} was changed after it was written: its manifest_sha256 is "
                f"{recorded!r}, its content hashes to {actual} (a hand-edited step, size or "
                f"sha256 is never trusted); {fix}"
            )
    claimed = _folder_step(folder)
    if claimed is not None and claimed != manifest["step"]:
        raise CheckpointCorruptError(
            f"{folder} is named for step {claimed} but its manifest says step "
            f"{manifest['step']}: the folder was renamed or copied by hand, and using it would "
            f"misorder resume and pruning; rename it back to step {manifest['step']} or {fix}"
        )
    return manifest


def _verify(folder: Path) -> dict[str, Any]:
    manifest = _read_manifest(folder)
    state = folder / STATE_FILE
    fix = f"delete {folder} (resume then uses the newest checkpoint that verifies)"
    try:
        size, digest = _sha256_file(state, manifest["size"], fix)
    except FileNotFoundError:
        raise CheckpointCorruptError(
            f"{state} is missing (the manifest expects {manifest['size']} bytes); {fix}"
        ) from None
    except CheckpointError:
        raise
    except OSError as exc:
        raise CheckpointError(f"cannot read {state}: {exc}; check permissions and mounts") from exc
    if size != manifest["size"]:
        what = (
            "is empty (0 bytes)"
            if size == 0
            else f"has more than {manifest['size']} bytes"
            if size > manifest["size"]
            else f"has {size} bytes"
        )
        raise CheckpointCorruptError(
            f"{state} {what}, the manifest says {manifest['size']}: the file is truncated "
            f"or was replaced; {fix}"
        )
    if digest != manifest["sha256"]:
        raise CheckpointCorruptError(
            f"{state} has sha256 {digest}, the manifest says {manifest['sha256']}: the file "
            f"was damaged or modified after it was written; {fix}"
        )
    return manifest


def _load_state(state: Path, map_location: MapLocation) -> Any:
    # weights_only=True only, never a fallback to full pickle and no extra safe globals:
    # a checkpoint is data, and loading one must not run code from it.
    fd = _open_regular(state, f"delete {state.parent}")
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


_Steps = list[int]  # ``list`` is a method name inside CheckpointStore


def _listing(runs: Mapping[str, _Steps]) -> str:
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


#: Lock files held by this process, by (st_dev, st_ino). POSIX record locks belong to the
#: process, and closing ANY descriptor of a locked file drops them, so a second lock in the
#: same process is refused from this table without ever opening the file again.
_HELD: dict[tuple[int, int], str] = {}
_HELD_GUARD = threading.Lock()


def _job_id() -> str | None:
    """The launcher's job id, when one is set (names the holder of a lock)."""
    for key in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID"):
        value = os.environ.get(key)
        if value and value != "none":
            return f"{key}={value}"
    return None


def _describe_holder(raw: bytes) -> str:
    try:
        info = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        info = None
    if not isinstance(info, dict):
        return "a process that did not record itself"
    where = f"pid {info.get('pid')} on host {info.get('host')!r}"
    extra = [f"since {info['started']}"] if info.get("started") else []
    if info.get("job"):
        extra.append(str(info["job"]))
    if info.get("argv"):
        extra.append(f"command {' '.join(map(str, info['argv']))!r}")
    pid = info.get("pid")
    if info.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
        extra.append(
            "that process has exited, yet the lock is held: the file system keeps stale "
            "locks (NFS) or the lock file was replaced"
        )
    return where + (f" ({', '.join(extra)})" if extra else "")


class _FolderLock:
    """An exclusive, non-blocking POSIX record lock on ``<directory>/.lock-<prefix>``.

    The kernel drops the lock when the holding process exits, however it exits (SIGKILL
    included), so a killed job never leaves a stale lock on a local file system. The file
    itself stays (deleting a lock file races with the next job opening it); it records who
    holds the lock, for the error message of the next job.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._key: tuple[int, int] | None = None
        self.enforced = False

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`CheckpointInUseError` naming the holder."""
        with _HELD_GUARD:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise CheckpointError(f"cannot use lock file {self.path}: {exc}") from exc
            else:
                holder = _HELD.get((st.st_dev, st.st_ino))
                if holder is not None:
                    raise CheckpointInUseError(
                        f"{self.path.parent} is already in use by this process ({holder}); "
                        "finish that fit() or store.lock() first, or use another directory"
                    )
            self._acquire()

    def _acquire(self) -> None:
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as exc:
            raise CheckpointError(
                f"cannot create the lock file {self.path}: {exc}; {_os_error_advice(exc)}"
            ) from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CheckpointError(
                    f"{self.path} is {_kind(st.st_mode)}, expected the regular lock file "
                    "devlayer creates; remove it and start again"
                )
            self.enforced = self._lock(fd)
            info = {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "job": _job_id(),
                "argv": sys.argv[:4],
            }
            data = (json.dumps(info) + "\n").encode("utf-8")
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)  # drops the lock if we had taken it
            raise
        self._fd, self._key = fd, (st.st_dev, st.st_ino)
        _HELD[self._key] = f"pid {os.getpid()}"

    def _lock(self, fd: int) -> bool:
        """Lock ``fd``; False (with a warning) where the file system has no locks."""
        if sys.platform == "win32":  # pragma: no cover - no POSIX record locks
            warnings.warn(
                f"checkpoint folder locks are not available on Windows; {self.path.parent} is "
                "not protected against a second job writing into it",
                CheckpointWarning,
                stacklevel=4,
            )
            return False
        import fcntl

        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                raw = os.pread(fd, 4096, 0)
                raise CheckpointInUseError(
                    f"{self.path.parent} is in use by another job: {_describe_holder(raw)} "
                    f"holds {self.path.name}. Two jobs writing one checkpoint folder destroy "
                    "each other's checkpoints; wait for that job to end (its lock goes with "
                    "its process, also when it is killed), stop it, or give this run another "
                    "checkpoint directory"
                ) from None
            if exc.errno in _LOCKS_UNSUPPORTED:
                warnings.warn(
                    f"the file system of {self.path.parent} does not support file locks "
                    f"({exc}); it is not protected against a second job writing into it",
                    CheckpointWarning,
                    stacklevel=4,
                )
                return False
            raise CheckpointError(f"cannot lock {self.path}: {exc}") from exc
        return True

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases it); idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with _HELD_GUARD:
            if self._key is not None:
                _HELD.pop(self._key, None)
            os.close(fd)


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
        InvalidArgumentError: ``keep`` below 1 or not an int, or an unusable ``prefix``
            or ``run_id``.

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
        self.keep = _int_arg("keep", keep, 1)
        if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
            raise InvalidArgumentError(
                f"prefix={prefix!r} cannot name checkpoint folders; use letters, digits, "
                "'_', '.' and '-', not starting with '.' or '-' (e.g. 'step')"
            )
        if run_id is not None and not (isinstance(run_id, str) and _RUN_ID.fullmatch(run_id)):
            raise InvalidArgumentError(
                f"run_id={run_id!r} cannot be recorded; use up to 128 letters, digits and "
                "'_', '.', ':', '-' (e.g. CheckpointStore.new_run_id())"
            )
        self.directory = Path(directory)
        self.prefix = prefix
        self.run_id = run_id
        self.private = bool(private)
        self._name = re.compile(rf"{re.escape(prefix)}-(\d+)")
        self._temp_name = re.compile(
            rf"{re.escape(TEMP_PREFIX + prefix)}-(\d+)\.(new|old|del|probe)\.(.+)"
        )
        self._lock = _FolderLock(self.directory / f"{LOCK_PREFIX}{prefix}")

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
        name = f"{TEMP_PREFIX}{final.name}.{kind}.{os.getpid()}.{_host_tag()}"
        return self.directory / f"{name}.{secrets.token_hex(4)}"

    def _mkdir(self, path: Path, *, parents: bool = False) -> None:
        path.mkdir(parents=parents, exist_ok=parents, mode=0o700 if self.private else 0o777)
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
                f"{_os_error_advice(exc)}"
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
        """Create, fsync and remove a probe file: find an unwritable directory early.

        Raises:
            CheckpointError: The directory cannot be created or written (read-only mount,
                permissions, full disk); the message names it and the OS error.
        """
        probe = self._temp_path(self.path_for(0), "probe")
        try:
            self._mkdir(self.directory, parents=True)
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, b"devlayer write probe\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.unlink(probe)
            _fsync_dir(self.directory)
        except OSError as exc:
            with contextlib.suppress(OSError):
                probe.unlink()
            raise CheckpointError(
                f"checkpoint directory {self.directory} is not usable: {exc}; "
                f"{_os_error_advice(exc)}. Checked before training, so no work is lost"
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
            self._mkdir(self.directory, parents=True)
            temp = self._temp_path(final, "new")
            self._mkdir(temp)
        except OSError as exc:
            raise CheckpointError(
                f"cannot create a checkpoint folder in {self.directory}: {exc}; "
                f"{_os_error_advice(exc)}"
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
        os_error = _os_error(exc)
        if os_error is not None:
            raise CheckpointError(
                f"could not write checkpoint step {step} into {self.directory}: {os_error}. "
                f"Earlier checkpoints are untouched; {_os_error_advice(os_error)}, and save "
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
            writer = _HashingWriter(f)
            try:
                torch.save(payload, cast(IO[bytes], writer))
            except OSError:
                raise
            except Exception as exc:
                # torch wraps an OSError of the file (a full disk) in a RuntimeError.
                os_error = writer.error or _os_error(exc)
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
            "run_id": self.run_id,
            "extra": extra,
        }
        manifest["manifest_sha256"] = _manifest_digest(manifest)
        with self._create(temp / MANIFEST_FILE) as f:
            f.write((json.dumps(manifest, indent=2, allow_nan=False) + "\n").encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(temp)

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
            _fsync_dir(self.directory)
        except OSError as exc:
            raise CheckpointError(
                f"{final} was renamed into place but {self.directory} could not be synced "
                f"({exc}); the checkpoint may not survive a power loss, check the disk"
            ) from exc
        if aside is not None:
            with contextlib.suppress(OSError):
                _remove(aside)  # a symlinked step folder: the link only

    def _counts(self, path: Path) -> bool:
        """Whether ``path`` is a checkpoint that pruning may rank: its manifest reads and
        names the step of the folder's name (a renamed folder must not push real steps out).
        """
        try:
            _read_manifest(path)
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
                _remove(gone)
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
        here = host == _host_tag()
        if here and pid == os.getpid():
            return True
        if (here or host is None) and _alive(pid):
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
                _remove(path)
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
        runs = self.runs()
        if len(runs) > 1:
            raise CheckpointRunError(
                f"{self.directory} holds checkpoints of {len(runs)} runs ({_listing(runs)}); "
                "resuming would continue one of them on a guess. Move the other run's "
                "folders away (or delete them), or load one checkpoint by its path"
            )
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
                manifest = _read_manifest(path)
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
            devlayer.train.errors.CheckpointWorldSizeError: ...
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


# -- the Trainer's folder: lock, probe, run identity, resume choice -----------------------


@contextlib.contextmanager
def _sigterm_stops(what: str) -> Iterator[None]:
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
    cls = globals().get(name)
    if isinstance(cls, type) and issubclass(cls, CheckpointError):
        return cls
    return CheckpointError


def _fresh_run_refused(store: CheckpointStore) -> CheckpointRunError:
    runs = store.runs()
    steps = [p.name for p in store.list()]
    held = _listing(runs) if runs else f"{len(steps)} checkpoint(s): {', '.join(steps[:4])}"
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
                with _sigterm_stops(f"preparing checkpoint directory {self.store.directory}"):
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
            found = store._latest(None)
            if found is None:
                return None, store.new_run_id()
            path, manifest = found
        else:
            path = _resolve(resume)
            manifest = _verify(path)
            others = {k: v for k, v in store.runs().items() if k != manifest.get("run_id")}
            if others:
                raise CheckpointRunError(
                    f"resume={str(resume)!r} continues run {manifest.get('run_id')!r}, but "
                    f"{store.directory} holds checkpoints of another run ({_listing(others)}); "
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
        with _sigterm_stops(f"resuming from {path}"):
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
            CheckpointCorruptError: The manifest's step differs from the saved trainer step.
            CheckpointError: Missing, unexpected or differently shaped model entries; the
                message lists them (saved shape vs this model's).
        """
        saved_step = payload.get("global_step")
        if isinstance(saved_step, int) and saved_step != manifest["step"]:
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


# -- random number generators ------------------------------------------------------------


# -- plain values ---------------------------------------------------------------------------
