"""Checkpoints written in the background (``Trainer(checkpoint_async=True)``, issue 24).

A save has two halves. On the training thread, at the step boundary where the save is due
(the same step on every rank), the state is *staged*: every tensor is copied into CPU memory
of its own (pinned where the run's device is an accelerator, so the copy can overlap), so the
next optimizer steps cannot change what is written. A daemon thread then writes the staged
copy with the ordinary :class:`~devlayer.train.checkpoint.CheckpointStore` protocol (temp
folder, fsync, checksummed manifest, one rename), so a background checkpoint is the same
files as a synchronous one.

Agreement between ranks never uses a collective from the background thread. Each rank's
writer only records its outcome (:class:`Background`); the training thread of every rank
asks its own writer at each step boundary while a save is in flight and the ranks combine
the answers with one small ``all_reduce`` (:func:`agreed_status`). Every rank makes that call
at the same steps, because "a save is in flight" starts at an agreed step and ends only on an
agreed answer, so these calls pair with each other and never with training collectives.

Example:
    >>> import torch
    >>> live = {"w": torch.zeros(2), "step": 3}
    >>> copy = stage(live, pin=False)
    >>> _ = live["w"].add_(1)
    >>> copy["w"].tolist(), copy["step"]
    ([0.0, 0.0], 3)
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from devlayer.train.files import find_os_error

__all__ = [
    "FAILED",
    "OK",
    "RUNNING",
    "WAIT_TIMEOUT",
    "Background",
    "describe_error",
    "stage",
    "staged_bytes",
]

log = logging.getLogger("devlayer.train")

#: Longest wait (seconds) for a background save before the next save, at the end of
#: ``fit()``, on preemption or after an exception; a writer still busy then is an error.
WAIT_TIMEOUT = 1800.0

#: A rank's answer about its writer, combined by ``max`` over the ranks.
OK, RUNNING, FAILED = 0, 1, 2


def stage(obj: Any, *, pin: bool, into: Any = None) -> Any:
    """A copy of ``obj`` that later training steps cannot change.

    Tensors are copied into CPU memory of their own (page-locked when ``pin``: an
    accelerator's device-to-host copy is then faster); dicts, lists and tuples are rebuilt;
    other values (numbers, strings, ``None``) are immutable and shared. With ``into`` (the
    previous save's copy, no longer read by anyone) a tensor is copied into the one at the
    same place when shape and dtype match: fresh memory costs several times the copy itself.

    Args:
        obj: A payload of state dicts and plain values.
        pin: Allocate page-locked ("pinned") host memory for the copies.
        into: A copy this function returned before (``None``: allocate everything).

    Returns:
        The staged copy.
    """
    import torch

    if isinstance(obj, torch.Tensor):
        src = obj.detach()
        out = into if _fits(into, src) else None
        if out is None:
            out = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=pin)
        return out.copy_(src)
    if isinstance(obj, Mapping):
        old = into if isinstance(into, Mapping) else {}
        items = [(k, stage(v, pin=pin, into=old.get(k))) for k, v in obj.items()]
        try:
            return type(obj)(items)  # type: ignore[call-arg]  # OrderedDict stays one
        except TypeError:  # a mapping type built otherwise (defaultdict): a plain dict
            return dict(items)
    if isinstance(obj, (list, tuple)):
        old_items = list(into)[: len(obj)] if isinstance(into, (list, tuple)) else []
        old_items += [None] * (len(obj) - len(old_items))
        staged = [stage(v, pin=pin, into=o) for v, o in zip(obj, old_items, strict=True)]
        if isinstance(obj, list):
            return staged
        return type(obj)(*staged) if hasattr(obj, "_fields") else type(obj)(staged)
    return obj


def _fits(old: Any, src: Any) -> bool:
    """``old`` is a CPU tensor ``src`` can be copied into as it is."""
    import torch

    return (
        isinstance(old, torch.Tensor)
        and old.device.type == "cpu"
        and old.shape == src.shape
        and old.dtype == src.dtype
        and old.is_contiguous()
    )


def staged_bytes(obj: Any) -> int:
    """Bytes of tensor data in ``obj`` (the staging copy's extra memory)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(staged_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(staged_bytes(v) for v in obj)
    return 0


def describe_error(exc: BaseException) -> str:
    """``exc`` as one line; an OS error names its errno (``ENOSPC``) for the log and the user."""
    os_error = find_os_error(exc)
    code = errno.errorcode.get(os_error.errno or 0) if os_error is not None else None
    text = f"{type(exc).__name__}: {exc}"
    return f"{text} ({code})" if code else text


class Background:
    """At most one save running in a daemon thread, and its outcome.

    Example:
        >>> bg = Background()
        >>> bg.start(4, lambda: None)
        >>> bg.join(10.0), bg.status(), bg.step
        (True, 0, 4)
        >>> bg.clear(); bg.in_flight
        False
    """

    def __init__(self) -> None:
        self.step: int | None = None
        self.path: Path | None = None
        self.error: str | None = None
        self._thread: threading.Thread | None = None

    @property
    def in_flight(self) -> bool:
        """A save was started and its outcome not yet agreed (:meth:`clear` not called)."""
        return self.step is not None

    def start(self, step: int, work: Callable[[], Path | None]) -> None:
        """Run ``work`` (the save of ``step``) in a daemon thread; one at a time.

        Raises:
            RuntimeError: A save is still in flight (a caller bug: wait first).
        """
        if self.in_flight:
            raise RuntimeError(f"checkpoint step {self.step} is still in flight")
        self.step, self.path, self.error = step, None, None
        thread = threading.Thread(
            target=self._run, args=(work,), name=f"devlayer-checkpoint-{step}", daemon=True
        )
        self._thread = thread
        thread.start()

    def _run(self, work: Callable[[], Path | None]) -> None:
        try:
            self.path = work()
        except BaseException as exc:  # reported on the training thread, never lost
            self.error = describe_error(exc)
            log.error("background save of checkpoint step %s failed: %s", self.step, self.error)

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the writer; True when it has finished."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def status(self) -> int:
        """:data:`OK`, :data:`RUNNING` or :data:`FAILED` for this rank's writer."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            return RUNNING
        return FAILED if self.error is not None else OK

    def clear(self) -> None:
        """Forget the finished save (its outcome was agreed)."""
        self.step, self._thread = None, None
