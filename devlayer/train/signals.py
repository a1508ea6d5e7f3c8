"""SIGTERM handling shared by the Trainer loop and the checkpoint code."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from devlayer.hangdump import dump_handler_of

__all__ = ["on_sigterm"]


@contextlib.contextmanager
def on_sigterm(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """Call ``handler(signum, frame)`` on SIGTERM inside the block, then restore the old one.

    Only the main thread may install signal handlers; elsewhere the block runs unchanged.
    When the handler in place is devlayer's hang-dump handler, the dump is still written
    before ``handler`` runs.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # devlayer's hang-dump handler (devlayer.hangdump) keeps writing its dump meanwhile: a
    # rank stuck inside the block still leaves its stack before the launcher's SIGKILL.
    dump = dump_handler_of(signal.getsignal(signal.SIGTERM))

    def chained(signum: int, frame: Any) -> None:
        if dump is not None:
            dump(signum, frame)
        handler(signum, frame)

    previous = signal.signal(signal.SIGTERM, chained if dump is not None else handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
