"""Small network helpers the library shares: a free loopback port, a store call with a bound."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["bounded_call", "free_port"]


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bounded_call(make: Callable[[], Any], deadline: float) -> Any:
    """``make()`` in a helper thread, given up at ``deadline`` (``time.monotonic()``).

    For calls on torch's TCP store that must not outlast a bound (connecting, a mark at
    ``shutdown()``): torch's TCPStore client waits forever for an answer when the port is
    held by a program that accepts connections but is not a store (seen with torch 2.13: a
    listener that never answers kept rank 1 waiting past a 4 s timeout for over a minute),
    and its timeout does not end a request already waiting on a host that stopped
    answering. The call releases the GIL, so the thread can be left behind (daemon) while
    the error is raised.

    Raises:
        TimeoutError: ``make()`` did not return by the deadline (plus one second for torch's
            own timeout error to arrive first).
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = make()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name="devlayer-store-call", daemon=True)
    thread.start()
    thread.join(max(deadline - time.monotonic(), 0.0) + 1.0)
    if "error" in box:
        raise box["error"]
    if "value" in box:
        return box["value"]
    raise TimeoutError
