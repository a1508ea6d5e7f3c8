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
ways and never runs two separate jobs. A launcher that started this process as its only rank
(``torchrun --nproc-per-node=1``) is no such case: spawn starts its ranks as a job of their
own, with their own store, and does not pass the launcher's variables on.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from multiprocessing.connection import wait
from typing import Any

from devlayer.config import Settings, parse_timeout, short_repr
from devlayer.devices import spec_text, usable_cpus
from devlayer.errors import DevlayerError, InvalidArgumentError

__all__ = ["MIN_NPROCS_LIMIT", "PROCS_PER_CPU", "RankFailedError", "max_nprocs", "spawn"]

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


#: spawn starts at most this many ranks per CPU core this process may use, and never refuses
#: up to :data:`MIN_NPROCS_LIMIT`: every rank is a Python process that imports torch (a few
#: hundred MB each), so ``nprocs=10**9`` is refused at once instead of building a billion
#: ``Process`` objects (a bare ``MemoryError`` minutes later, or the OOM killer).
PROCS_PER_CPU = 4
#: The smallest limit, for small machines (tests with a few ranks on one or two cores).
MIN_NPROCS_LIMIT = 8
#: Variables torchrun gives the rank it started. A rank spawn starts belongs to a job of its
#: own (its own store on a free port); with ``TORCHELASTIC_USE_AGENT_STORE=True`` inherited it
#: would wait for a torchrun agent store that nobody hosts for it.
_LAUNCHER_NAMES = (
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "ROLE_NAME",
    "NODE_RANK",
)
_LAUNCHER_PREFIX = "TORCHELASTIC_"


def max_nprocs(cpus: int) -> int:
    """The most ranks :func:`spawn` starts on a machine where this process may use ``cpus``.

    Example:
        >>> max_nprocs(2), max_nprocs(64)
        (8, 256)
    """
    return max(MIN_NPROCS_LIMIT, PROCS_PER_CPU * cpus)


def _launcher_vars(names: Iterable[str]) -> list[str]:
    """The variables among ``names`` that a launcher set for this process alone.

    Example:
        >>> _launcher_vars(["TORCHELASTIC_USE_AGENT_STORE", "GROUP_RANK", "HOME"])
        ['TORCHELASTIC_USE_AGENT_STORE', 'GROUP_RANK']
    """
    return [n for n in names if n.startswith(_LAUNCHER_PREFIX) or n in _LAUNCHER_NAMES]


def _child(
    rank: int,
    nprocs: int,
    port: int,
    fn: Callable[..., Any],
    args: Sequence[Any],
    env: Mapping[str, str],
    results: Any,
) -> None:
    for name in _launcher_vars(list(os.environ)):
        del os.environ[name]
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
    from devlayer import lifecycle  # here, not at the top: spawn's parent needs no torch

    try:
        lifecycle.init()  # spawn's arguments arrive as DEVLAYER_* variables (see _settings)
        value = fn(*args)
    except BaseException:
        # Report first: a graceful shutdown could wait on peers that are still running.
        results.put((rank, "error", traceback.format_exc()))
        results.close()
        results.join_thread()
        os._exit(1)
    lifecycle.shutdown()
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
    join_timeout: float | timedelta | None = None,
    env: Mapping[str, str] | None = None,
    comm: str | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` on ``nprocs`` local ranks and return their results in rank order.

    Each rank calls ``devlayer.init()`` before ``fn``; ``backend``, ``devices``, ``timeout``
    and ``comm`` reach it as ``DEVLAYER_BACKEND``, ``DEVLAYER_DEVICES``, ``DEVLAYER_TIMEOUT``
    and ``DEVLAYER_COMM``, so ``fn`` may call ``devlayer.init()`` again with the same
    request (``init(comm="gloo")`` after ``spawn(..., comm="gloo")``) and gets the same State.

    Args:
        fn: A picklable (module-level) function. With the ``spawn`` start method the
            calling script is re-imported in each child: keep the call under
            ``if __name__ == "__main__":``.
        nprocs: Number of ranks, from 1 to :func:`max_nprocs` (4 per usable CPU core, at
            least 8); more is an error before anything is started.
        args: Positional arguments for ``fn``.
        backend: The backend for ``devlayer.init()`` in each rank.
        devices: The device spec for ``devlayer.init()`` in each rank.
        timeout: Collective/rendezvous timeout for ``devlayer.init()``.
        join_timeout: Seconds (or a timedelta) for the whole run; when exceeded every child
            is stopped and :class:`RankFailedError` names the ranks still running. ``None``
            waits forever; zero, negative, nan, infinite and non-numbers are refused.
        env: Extra environment variables for the children.
        comm: The process-group backend for ``devlayer.init()`` (``"gloo"``...).

    Returns:
        ``[fn result of rank 0, rank 1, ...]`` (results must be picklable).

    Raises:
        RankFailedError: The first rank that raised or exited non-zero, with its traceback.
        InvalidArgumentError: A bad argument (named), or a launcher already started this
            process as one of several ranks, with a number of ranks per node other than
            ``nprocs``.

    Under a launcher: when ``srun``, ``mpirun``, ``torchrun`` (anything for which
    :func:`devlayer.launched` is True) started this process as one of
    ``local_world_size == nprocs`` ranks on its node, no process is started: ``fn`` runs
    here as that rank (after ``devlayer.init()``) and every rank returns the results of the
    whole world in rank order. ``join_timeout`` is then the launcher's business. When the
    launcher started this process as its only rank (``torchrun --nproc-per-node=1``),
    spawn starts ``nprocs`` ranks of a job of their own, with their own store on a free
    loopback port; the launcher's variables (``TORCHELASTIC_*``...) are not passed on.

    Example:
        >>> import devlayer
        >>> devlayer.spawn(devlayer.rank, nprocs=2, backend="cpu", join_timeout=60)
        [0, 1]
    """
    _check_nprocs(nprocs)
    deadline_s = _join_seconds(join_timeout)
    child_env = _settings(backend, devices, timeout, comm, env or {})
    from devlayer.launchers import detect
    from devlayer.net import free_port

    info = detect(os.environ)
    if info.world_size > 1:
        return _in_place(info, nprocs, fn, tuple(args), child_env)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_child,
            args=(r, nprocs, port, fn, tuple(args), child_env, results),
            name=f"devlayer-rank{r}",
            daemon=False,
        )
        for r in range(nprocs)
    ]
    for p in procs:
        p.start()
    deadline = None if deadline_s is None else time.monotonic() + deadline_s
    values: dict[int, Any] = {}
    failure: RankFailedError | None = None
    try:
        failure = _supervise(procs, results, values, deadline)
    finally:
        _stop(procs)
    if failure is not None:
        raise failure
    return [values.get(r) for r in range(nprocs)]


def _check_nprocs(nprocs: object) -> None:
    """An int from 1 to :func:`max_nprocs`, checked before any process object exists."""
    if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
        raise InvalidArgumentError(f"nprocs={short_repr(nprocs)} must be an int >= 1")
    cpus = usable_cpus()
    limit = max_nprocs(cpus)
    if nprocs > limit:
        raise InvalidArgumentError(
            f"nprocs={short_repr(nprocs)} is more ranks than spawn starts here: at most "
            f"{limit} ({PROCS_PER_CPU} per usable CPU core, {cpus} here; each rank is a "
            f"Python process that imports torch). Use fewer ranks, or a launcher such as "
            f"torchrun or srun across several nodes"
        )


def _join_seconds(join_timeout: object) -> float | None:
    """``join_timeout`` in seconds: None, or a positive finite number (or timedelta)."""
    if join_timeout is None:
        return None
    if isinstance(join_timeout, str):  # parse_timeout reads text only from variables
        raise InvalidArgumentError(
            f"join_timeout={short_repr(join_timeout)} has type str; pass seconds as a number "
            f"or a datetime.timedelta, or None to wait without a limit"
        )
    parsed = parse_timeout(join_timeout, origin="join_timeout")
    assert parsed is not None  # not None in, not None out
    return parsed.total_seconds()


def _settings(
    backend: object, devices: object, timeout: object, comm: object, env: Mapping[str, str]
) -> dict[str, str]:
    """The children's environment: ``env`` plus spawn's arguments as DEVLAYER_* variables.

    Raises:
        InvalidArgumentError: A bad argument, or one that ``env`` sets to something else.
    """
    out = dict(env)
    if backend is not None and (not isinstance(backend, str) or not backend.strip()):
        raise InvalidArgumentError(
            f"backend={short_repr(backend)} is not a name; pass a name such as 'cpu', or "
            f"leave it out (None) for the default"
        )
    # Normalised as init() normalises them, so each rank's init() sees the same request.
    given = Settings().given("devices", devices).given("timeout", timeout).given("comm", comm)
    wanted: dict[str, str] = {}
    if backend is not None:
        wanted["DEVLAYER_BACKEND"] = backend.strip()
    if comm is not None:
        wanted["DEVLAYER_COMM"] = str(comm).strip()  # given.comm checked it is a name
    if devices is not None:
        wanted["DEVLAYER_DEVICES"] = spec_text(given.devices)
    if timeout is not None:
        wanted["DEVLAYER_TIMEOUT"] = repr(given.timeout.total_seconds())
    for key, value in wanted.items():
        if key in out and out[key] != value:
            raise InvalidArgumentError(
                f"spawn's argument sets {key}={value!r}, but env= sets {key}={out[key]!r}; "
                f"give the value once"
            )
    out.update(wanted)
    return out


def _in_place(
    info: Any,
    nprocs: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
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
    from devlayer import comm, lifecycle

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    owns = not lifecycle.is_initialized()
    try:
        lifecycle.init()
        try:
            outcome: tuple[str, Any] = ("ok", fn(*args))
        except Exception:
            outcome = ("error", traceback.format_exc())
        # Every rank reports, so a rank that raised is named everywhere instead of
        # leaving its peers waiting in their next collective.
        outcomes = comm.all_gather_object(outcome)
        for rank, (status, payload) in enumerate(outcomes):
            if status == "error":
                raise _raised(rank, str(payload))
        return [payload for _, payload in outcomes]
    finally:
        if owns:
            lifecycle.shutdown()
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
