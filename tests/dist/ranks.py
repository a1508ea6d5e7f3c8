"""The one way tests/dist starts ranks: ``devlayer.spawn`` from a clean environment, or plain
processes that find each other through ``RANK``/``WORLD_SIZE``/``MASTER_*``, each with a
timeout, a free port and no launcher variables inherited from the shell."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Sequence
from typing import Any

import pytest

import devlayer
from devlayer.testing import free_port
from tests.helpers import _LAUNCH_NAMES, _LAUNCH_PREFIXES, PY, ROOT, subprocess_env


def spawn_clean(
    fn: Callable[..., Any],
    nprocs: int = 2,
    *,
    timeout: float = 30,
    join_timeout: float = 150,
    **kwargs: Any,
) -> list[Any]:
    """``devlayer.spawn(fn, nprocs, backend="cpu", ...)`` with the launcher variables of
    this shell removed for the call (what the ``clean_env`` fixture does, usable in module
    fixtures, which cannot take it); returns every rank's result."""
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith(_LAUNCH_PREFIXES) or key in _LAUNCH_NAMES:
                mp.delenv(key)
        return devlayer.spawn(
            fn, nprocs=nprocs, backend="cpu", timeout=timeout, join_timeout=join_timeout, **kwargs
        )


def start_ranks(
    argv: Sequence[str],
    *,
    world: int = 2,
    nprocs: int | None = None,
    addr: str = "127.0.0.1",
    port: int | None = None,
    stderr: int = subprocess.PIPE,
    env: dict[str, str] | None = None,
) -> list[subprocess.Popen[str]]:
    """Start ``python <argv>`` as ranks ``0 .. nprocs - 1`` of ``world`` (default: all of
    them), under the ``env`` launcher, on ``addr:port`` (default a free loopback port),
    with ``env`` on top of the test environment."""
    port = free_port() if port is None else port
    return [
        subprocess.Popen(
            [PY, *argv],
            env=subprocess_env(
                RANK=str(rank),
                WORLD_SIZE=str(world),
                MASTER_ADDR=addr,
                MASTER_PORT=str(port),
                DEVLAYER_LAUNCHER="env",
                **(env or {}),
            ),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        for rank in range(world if nprocs is None else nprocs)
    ]


def finish(procs: Sequence[subprocess.Popen[str]], timeout: float) -> list[tuple[int, str, str]]:
    """``(returncode, stdout, stderr)`` of each process; one still running after ``timeout``
    seconds is killed (its returncode then says so), so a hang fails the test, never blocks."""
    done = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        done.append((proc.returncode, out, err or ""))
    return done
