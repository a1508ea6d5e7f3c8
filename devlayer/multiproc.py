"""Start N local ranks from plain ``python`` (``python train.py --nprocs 2``).

The module is not called ``spawn`` so that it cannot shadow the function ``devlayer.spawn()``.

:func:`spawn` is for scripts that launch themselves, as perceptrain and Ignite's
``Parallel`` do. Each child gets the torchrun-style variables, a free loopback port and
``DEVLAYER_LAUNCHER=env``, calls ``devlayer.init()`` and then ``fn(*args)``. The first
failure (exception or exit) stops the others and is raised in the parent with the child's
traceback text. A ``timeout`` bounds the whole run, so a stuck rank cannot hang the parent.

Under a launcher (``srun``, ``mpirun``, ``torchrun``, ...) that already started this process
as one of several ranks, :func:`spawn` starts nothing: it runs ``fn`` in place as that rank
(when ``nprocs`` matches the launcher's ranks per node) or refuses, so one script works both
ways and never runs two separate jobs.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from multiprocessing.connection import wait
from typing import Any

from devlayer.errors import DevlayerError, InvalidArgumentError

__all__ = ["RankFailedError", "spawn"]

_GRACE_S = 3.0


class RankFailedError(DevlayerError):
    """A rank started by :func:`spawn` raised or died.

    Attributes:
        rank: The first rank that failed.
        exitcode: Its exit code (negative: killed by that signal), if it exited.
        remote_traceback: The traceback text from the child, if it raised.
    """

    def __init__(
        self, message: str, *, rank: int, exitcode: int | None, remote_traceback: str = ""
    ) -> None:
        super().__init__(message)
        self.rank = rank
        self.exitcode = exitcode
        self.remote_traceback = remote_traceback


def _child(
    rank: int,
    nprocs: int,
    port: int,
    fn: Callable[..., Any],
    args: Sequence[Any],
    init_kwargs: Mapping[str, Any],
    env: Mapping[str, str],
    results: Any,
) -> None:
    os.environ.update(env)
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(nprocs),
            "LOCAL_WORLD_SIZE": str(nprocs),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "DEVLAYER_LAUNCHER": "env",
        }
    )
    import devlayer

    try:
        devlayer.init(**init_kwargs)
        value = fn(*args)
    except BaseException:
        # Report first: a graceful shutdown could wait on peers that are still running.
        results.put((rank, "error", traceback.format_exc()))
        results.close()
        results.join_thread()
        os._exit(1)
    devlayer.shutdown()
    # Plain pickle copies tensors by value; the queue's own pickler would share them
    # through file descriptors that vanish when this process exits.
    results.put((rank, "ok", pickle.dumps(value)))


def spawn(
    fn: Callable[..., Any],
    nprocs: int = 2,
    args: Sequence[Any] = (),
    *,
    backend: str | None = None,
    devices: object = None,
    timeout: float | timedelta | None = None,
    join_timeout: float | None = None,
    env: Mapping[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` on ``nprocs`` local ranks and return their results in rank order.

    Args:
        fn: A picklable (module-level) function. With the ``spawn`` start method the
            calling script is re-imported in each child: keep the call under
            ``if __name__ == "__main__":``.
        nprocs: Number of ranks (>= 1).
        args: Positional arguments for ``fn``.
        backend: Passed to ``devlayer.init()`` in each child.
        devices: Passed to ``devlayer.init()`` in each child.
        timeout: Collective/rendezvous timeout passed to ``devlayer.init()``.
        join_timeout: Seconds for the whole run; when exceeded every child is stopped and
            :class:`RankFailedError` names the ranks still running. ``None`` waits forever.
        env: Extra environment variables for the children.

    Returns:
        ``[fn result of rank 0, rank 1, ...]`` (results must be picklable).

    Raises:
        RankFailedError: The first rank that raised or exited non-zero, with its traceback.
        InvalidArgumentError: A launcher already started this process as one of several
            ranks, with a number of ranks per node other than ``nprocs``.

    Under a launcher: when ``srun``, ``mpirun``, ``torchrun`` (anything for which
    :func:`devlayer.launched` is True) started this process as one of
    ``local_world_size == nprocs`` ranks on its node, no process is started: ``fn`` runs
    here as that rank (after ``devlayer.init()``) and every rank returns the results of the
    whole world in rank order. ``join_timeout`` is then the launcher's business.

    Example:
        >>> import devlayer
        >>> devlayer.spawn(devlayer.rank, nprocs=2, backend="cpu", join_timeout=60)
        [0, 1]
    """
    if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
        raise InvalidArgumentError(f"nprocs={nprocs!r} must be an int >= 1")
    from devlayer.launchers import detect
    from devlayer.net import free_port

    init_kwargs = {"backend": backend, "devices": devices, "timeout": timeout}
    info = detect(os.environ)
    if info.world_size > 1:
        return _in_place(info, nprocs, fn, tuple(args), init_kwargs, dict(env or {}))
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_child,
            args=(r, nprocs, port, fn, tuple(args), init_kwargs, dict(env or {}), results),
            name=f"devlayer-rank{r}",
            daemon=False,
        )
        for r in range(nprocs)
    ]
    for p in procs:
        p.start()
    deadline = None if join_timeout is None else time.monotonic() + join_timeout
    values: dict[int, Any] = {}
    failure: RankFailedError | None = None
    try:
        failure = _supervise(procs, results, values, deadline)
    finally:
        _stop(procs)
    if failure is not None:
        raise failure
    return [values.get(r) for r in range(nprocs)]


def _in_place(
    info: Any,
    nprocs: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    init_kwargs: Mapping[str, Any],
    env: Mapping[str, str],
) -> list[Any]:
    """Run ``fn`` as the rank a launcher started; results of every rank, in rank order."""
    if nprocs != info.local_world_size:
        raise InvalidArgumentError(
            f"devlayer.spawn(nprocs={nprocs}) in a process that {info.launcher} already "
            f"started as rank {info.rank} of {info.world_size} ({info.local_world_size} on "
            f"this node): spawning here would start {info.world_size * nprocs} processes in "
            f"{info.world_size} separate jobs. Start the script with plain python to let "
            f"spawn start the ranks, or let the launcher start {nprocs} per node (then spawn "
            f"runs fn in place), or call fn directly when devlayer.launched() is True"
        )
    import devlayer

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    owns = not devlayer.is_initialized()
    try:
        devlayer.init(**init_kwargs)
        try:
            outcome: tuple[str, Any] = ("ok", fn(*args))
        except Exception:
            outcome = ("error", traceback.format_exc())
        # Every rank reports, so a rank that raised is named everywhere instead of
        # leaving its peers waiting in their next collective.
        outcomes = devlayer.all_gather_object(outcome)
        for rank, (status, payload) in enumerate(outcomes):
            if status == "error":
                raise _raised(rank, str(payload))
        return [payload for _, payload in outcomes]
    finally:
        if owns:
            devlayer.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _drain(results: Any, values: dict[int, Any]) -> tuple[int, str] | None:
    """Collect queued results; return (rank, traceback) of the first error seen."""
    while True:
        try:
            rank, status, payload = results.get_nowait()
        except queue_mod.Empty:
            return None
        if status == "ok":
            values[rank] = pickle.loads(payload)  # trusted: our own child process
        else:
            return rank, str(payload)


def _supervise(
    procs: list[Any], results: Any, values: dict[int, Any], deadline: float | None
) -> RankFailedError | None:
    running = {p.sentinel: (r, p) for r, p in enumerate(procs)}
    while running:
        wait_s = 0.2 if deadline is None else max(0.0, min(0.2, deadline - time.monotonic()))
        for sentinel in wait(list(running), timeout=wait_s):
            rank, p = running.pop(sentinel)
            p.join()
            error = _drain(results, values)
            if error is not None:
                return _raised(*error)
            if p.exitcode != 0:
                # The child may have queued its traceback just before exiting.
                time.sleep(0.05)
                error = _drain(results, values)
                if error is not None:
                    return _raised(*error)
                return RankFailedError(
                    f"rank {rank} exited with code {p.exitcode}"
                    + (f" (killed by signal {-p.exitcode})" if p.exitcode < 0 else ""),
                    rank=rank,
                    exitcode=p.exitcode,
                )
        error = _drain(results, values)
        if error is not None:
            return _raised(*error)
        if deadline is not None and time.monotonic() >= deadline and running:
            left = sorted(r for r, _ in running.values())
            return RankFailedError(
                f"spawn: rank(s) {', '.join(map(str, left))} still running after the "
                f"join_timeout; stopped them all",
                rank=left[0],
                exitcode=None,
            )
    _drain(results, values)
    return None


def _raised(rank: int, text: str) -> RankFailedError:
    last = text.strip().splitlines()[-1] if text.strip() else "error"
    return RankFailedError(
        f"rank {rank} raised {last}\n--- traceback from rank {rank} ---\n{text}",
        rank=rank,
        exitcode=1,
        remote_traceback=text,
    )


def _stop(procs: list[Any]) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    end = time.monotonic() + _GRACE_S
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(1.0)
