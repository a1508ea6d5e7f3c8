"""The checkpoint folder lock: one job writes a folder at a time.

:class:`FolderLock` takes an exclusive, non-blocking POSIX record lock on
``<directory>/.lock-<prefix>``. The kernel drops it when the holding process exits, however
it exits (SIGKILL included), so a killed job never leaves a stale lock on a local file
system; the file records who holds it, so the next job's error names the holder.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> lock = FolderLock(Path(tempfile.mkdtemp()) / (LOCK_PREFIX + "step"))
    >>> lock.acquire(); lock.held
    True
    >>> lock.release(); lock.held
    False
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import sys
import threading
import warnings
from datetime import datetime, timezone
from pathlib import Path

from devlayer.train.errors import CheckpointError, CheckpointInUseError, CheckpointWarning
from devlayer.train.files import file_kind, os_error_advice, pid_alive

__all__ = ["LOCK_PREFIX", "FolderLock"]


#: Name of the lock file of a store, in its directory: ``.lock-<prefix>``.
LOCK_PREFIX = ".lock-"


_LOCKS_UNSUPPORTED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}


#: Lock files held by this process, by (st_dev, st_ino). POSIX record locks belong to the
#: process, and closing ANY descriptor of a locked file drops them, so a second lock in the
#: same process is refused from this table without ever opening the file again.
_HELD: dict[tuple[int, int], str] = {}


_HELD_GUARD = threading.Lock()


def _job_id() -> str | None:
    """The job id ``devlayer.init()`` read (``ProcessInfo.job_id``; names a lock's holder).

    None before ``init()``: the launcher's environment is read once, by ``init()``.
    """
    import devlayer

    return devlayer.state().process.job_id if devlayer.is_initialized() else None


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
    if info.get("host") == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid):
        extra.append(
            "that process has exited, yet the lock is held: the file system keeps stale "
            "locks (NFS) or the lock file was replaced"
        )
    return where + (f" ({', '.join(extra)})" if extra else "")


class FolderLock:
    """An exclusive, non-blocking POSIX record lock on ``<directory>/.lock-<prefix>``.

    The kernel drops the lock when the holding process exits, however it exits (SIGKILL
    included), so a killed job never leaves a stale lock on a local file system. The file
    itself stays (deleting a lock file races with the next job opening it); it records who
    holds the lock, for the error message of the next job.
    """

    def __init__(self, path: Path, *, private: bool = False) -> None:
        self.path = path
        self.private = private
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
                st = os.lstat(self.path)  # never through a planted link
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
        fd = self._open()
        try:
            st = os.fstat(fd)
            self._check_file(st)
            self.enforced = self._lock(fd)
            info = {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "job": _job_id(),
                "argv": sys.argv[:4],
            }
            data = (json.dumps(info) + "\n").encode("utf-8")
            if self.private and hasattr(os, "fchmod"):
                os.fchmod(fd, 0o600)  # it names host, pid and command line
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)  # drops the lock if we had taken it
            raise
        self._fd, self._key = fd, (st.st_dev, st.st_ino)
        _HELD[self._key] = f"pid {os.getpid()}"

    def _open(self) -> int:
        """Open (or create) the lock file without following a symlink or blocking."""
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
        flags |= getattr(os, "O_NOFOLLOW", 0)
        try:
            return os.open(self.path, flags, 0o600 if self.private else 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP or self.path.is_symlink():
                raise CheckpointError(
                    f"{self.path} is a symbolic link, expected the regular lock file devlayer "
                    "creates; devlayer never writes through a link planted in a checkpoint "
                    "folder. Check who created it, remove it and start again"
                ) from exc
            raise CheckpointError(
                f"cannot create the lock file {self.path}: {exc}; {os_error_advice(exc)}"
            ) from exc

    def _check_file(self, st: os.stat_result) -> None:
        """Refuse a lock file that is no regular file of ours with one name (never write it)."""
        problem = None
        if not stat.S_ISREG(st.st_mode):
            problem = f"is {file_kind(st.st_mode)}"
        elif hasattr(os, "geteuid") and st.st_uid != os.geteuid():
            problem = f"is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
        elif st.st_nlink > 1:
            problem = f"is a file with {st.st_nlink} names (hard links)"
        if problem is not None:
            raise CheckpointError(
                f"{self.path} {problem}, expected the regular lock file devlayer creates, "
                "owned by this user; devlayer never writes a file planted in a checkpoint "
                "folder. Check who created it, remove it and start again"
            )

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
