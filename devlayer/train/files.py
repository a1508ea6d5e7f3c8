"""Durable, bounded file work for checkpoints: fsync, hashing writes, regular-file reads.

Helpers of :mod:`devlayer.train.checkpoint` and :mod:`devlayer.train.lock` that know
nothing about checkpoints: a write that is hashed as it goes and reports a full disk as a
full disk, reads that refuse FIFOs and devices (so a resume cannot block on one) and stop
at a size limit, and the durability steps (``fsync`` of a folder after a rename).

Example:
    >>> import io
    >>> w = HashingWriter(io.BytesIO())
    >>> w.write(b"abc"), w.size, w.sha256.hexdigest()[:8]
    (3, 3, 'ba7816bf')
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import IO

from devlayer.train.errors import CheckpointCorruptError, CheckpointError

__all__ = [
    "HashingWriter",
    "check_replaceable",
    "file_kind",
    "find_os_error",
    "fsync_dir",
    "host_tag",
    "not_a_folder",
    "open_regular",
    "os_error_advice",
    "pid_alive",
    "read_regular",
    "remove_path",
    "sha256_file",
    "write_atomically",
]


_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}


_NO_PERMISSION = {errno.EACCES, errno.EPERM, errno.EROFS}


# fsync on a directory is not supported by every file system (some network and FUSE file
# systems answer EINVAL); that is not a failed write, so those answers are ignored.
_DIR_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


_CHUNK = 1 << 20


def fsync_dir(path: Path) -> None:
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


class HashingWriter:
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


def find_os_error(exc: BaseException | None) -> OSError | None:
    """The first ``OSError`` in ``exc``'s chain (torch wraps it in a RuntimeError)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def os_error_advice(exc: OSError) -> str:
    """What to do about an OSError while writing, by its errno."""
    if exc.errno in _DISK_FULL:
        return "the disk is full (or over quota): free disk space or use another directory"
    if exc.errno in _NO_PERMISSION:
        return "the directory is not writable: fix its permissions or mount, or use another one"
    if exc.errno == errno.ENAMETOOLONG:
        return "the path is too long for the file system: use a shorter checkpoint directory"
    if exc.errno == errno.ELOOP:
        return "fix or remove the symbolic link, or use another directory"
    return "check the disk and the directory"


def file_kind(mode: int) -> str:
    """``"a directory"``, ``"a FIFO (named pipe)"``, ... for what is not a regular file."""
    for test, name in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def not_a_folder(path: Path) -> OSError:
    """The error for a ``path`` that exists but is no folder: a symlink loop, a file..."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return OSError(errno.ELOOP, "a symbolic link loop, not a folder", str(path))
        return exc
    return NotADirectoryError(errno.ENOTDIR, f"{file_kind(mode)}, not a folder", str(path))


def open_regular(path: Path, fix: str) -> int:
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
            f"{path} is {file_kind(mode)}, expected a regular file (devlayer reads only regular "
            f"files, so a pipe or a device cannot block or flood a resume); {fix}"
        )
    return fd


def read_regular(path: Path, limit: int, fix: str) -> bytes:
    """The bytes of the regular file ``path``, refused when larger than ``limit``."""
    fd = open_regular(path, fix)
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


def sha256_file(path: Path, limit: int, fix: str) -> tuple[int, str]:
    """Size and sha256 of the regular file ``path``, reading at most ``limit + 1`` bytes."""
    digest = hashlib.sha256()
    size = 0
    fd = open_regular(path, fix)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            while size <= limit and (chunk := f.read(min(_CHUNK, limit + 1 - size))):
                digest.update(chunk)
                size += len(chunk)
    finally:
        os.close(fd)
    return size, digest.hexdigest()


def host_tag() -> str:
    """8 hex digits naming this host in temporary names (host names may hold dots)."""
    return hashlib.sha256(socket.gethostname().encode("utf-8")).hexdigest()[:8]


def pid_alive(pid: int) -> bool:
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


def remove_path(path: Path) -> None:
    """Remove a file, a symlink (never what it points to) or a real folder tree."""
    if path.is_symlink() or not path.is_dir():
        path.unlink()
    else:
        shutil.rmtree(path)


def check_replaceable(path: Path) -> None:
    """Refuse to replace ``path`` unless it is missing or a regular file (``lstat``).

    A rename replaces whatever has the name: a device node, a FIFO, a socket, a symlink
    (its target is never written, the link is lost) or an empty folder.

    Raises:
        CheckpointError: ``path`` exists and is no regular file; the message says what it is.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise CheckpointError(f"cannot check {path}: {exc}; {os_error_advice(exc)}") from exc
    if not stat.S_ISREG(mode):
        raise CheckpointError(
            f"{path} is {file_kind(mode)}, expected a regular file (or no file) to replace; "
            "devlayer replaces only regular files. Pass another path (a new file name, or "
            "the file a link points to)"
        )


def write_atomically(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write ``path`` through ``write(file)`` so it appears complete or not at all.

    The data goes to a hidden temporary file beside ``path``, is synced, then renamed over
    ``path`` in one step and the folder synced; on any error the temporary file is removed
    and ``path`` is untouched. Only a missing or regular ``path`` is replaced
    (:func:`check_replaceable`), checked before writing and again before the rename.
    """
    check_replaceable(path)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(temp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        check_replaceable(path)
        os.replace(temp, path)
        fsync_dir(path.parent)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
