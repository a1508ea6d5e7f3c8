"""DDP's gradient all_reduce in the collective ledger, through torch's comm-hook API.

DDP reduces gradients bucket by bucket from inside autograd, in C++, so devlayer's
collectives never see them: a rank that hangs in backward would show only the devlayer
collectives around it. With hang reports on (``DEVLAYER_HANG_REPORTS``, the default) and
world size > 1, :func:`record_ddp` registers one comm hook on a DDP model devlayer built
(``DistributedDataParallel.register_comm_hook``) that adds one ledger record per bucket:
op ``"ddp all_reduce"``, detail ``bucket <index> <shape> <dtype>``, running until the
bucket's future completes (marked in the same ``then`` callback torch's own
``allreduce_hook`` uses; failed when it errors).

Numerics: the hook scales the bucket by ``1 / world_size`` (``mul_``) before a SUM
all_reduce, as DDP's reducer does with a gradient that is not yet its bucket's view (a
fresh gradient each step: ``zero_grad(set_to_none=True)``, the Trainer's and torch's
default). torch's Python ``allreduce_hook`` divides instead; the two agree bit for bit
when the world size is a power of two (docs/hangs.md has the rest).

DDP takes one ``register_comm_hook`` call. Ours is made at wrap time, so the model's own
``register_comm_hook`` is replaced, on that instance, by :meth:`DDPRecorder.register`: a
user's hook (PowerSGD, fp16 compression) is then run by ours, with its future returned
unchanged, and recorded as ``"ddp <hook name>"``; a second call is refused as torch
refuses it. Left alone (nothing recorded): a DDP model the user wrapped, one that already
has a hook (DDP's ``mixed_precision``), and compiled autograd's python reducer mode, which
calls hooks per parameter.

Threads and sequence numbers: the hook runs inside backward, on the thread that called it
(CPU) or on autograd's device thread while that caller blocks in backward; DDP calls it
under its reducer's lock, one bucket at a time, in bucket index order on every rank. So
:meth:`~devlayer.ledger.Ledger.begin_at` never runs while the training thread starts a
devlayer collective (it is inside backward), the ledger's unlocked ``n += 1`` cannot
interleave, and every rank numbers the buckets alike. The completion callback may run on
the comm backend's thread; it only writes its own record's end and state (two list
stores; a reader sees the old or the new state, both true at some moment).
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any

from devlayer.comm import collective_ledger
from devlayer.errors import InvalidArgumentError
from devlayer.ledger import Ledger, describe, first_outside

__all__ = ["DDP_ALL_REDUCE", "DDPRecorder", "record_bucket", "record_ddp"]

#: The ledger op of a bucket reduced by DDP's default path.
DDP_ALL_REDUCE = "ddp all_reduce"

#: devlayer's own folder: its frames are not the user's.
_DEVLAYER = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _site(start: FrameType, skipped: tuple[str, ...]) -> tuple[CodeType, int]:
    """Code and offset of the user's frame for a hook called from ``start``.

    The first frame outside devlayer and torch up this thread's stack (the user's
    ``loss.backward()`` line, or the line that called devlayer's Trainer); when autograd
    runs the hook on a thread of its own, whose stack holds no such frame, the main
    thread's (which waits in that backward); when neither has one, ``start`` itself.
    """
    frame = first_outside(start, skipped)
    if frame is None and threading.current_thread() is not threading.main_thread():
        main = sys._current_frames().get(threading.main_thread().ident or 0)
        frame = first_outside(main, skipped)
    frame = frame or start
    return frame.f_code, frame.f_lasti


class DDPRecorder:
    """The state of devlayer's DDP comm hook: what :func:`record_bucket` runs per bucket.

    Args:
        group: DDP's process group.
        all_reduce: ``torch.distributed.all_reduce``.
        skipped: Folder prefixes whose frames are not the user's (devlayer's, torch's).

    Attributes:
        user: ``(hook, state)`` of the user's own comm hook, or None (DDP's default).
    """

    def __init__(
        self, group: Any, all_reduce: Callable[..., Any], skipped: tuple[str, ...]
    ) -> None:
        self.group = group
        self.scale = 1.0 / group.size()  # DDP's reducer multiplies by this reciprocal
        self.all_reduce = all_reduce
        self.skipped = skipped
        self.user: tuple[Callable[..., Any], object] | None = None

    def register(self, state: object, hook: Callable[..., Any]) -> None:
        """``register_comm_hook`` of a model devlayer records: ``hook`` runs in ours.

        Raises:
            InvalidArgumentError: ``hook`` is not callable, or a hook was registered
                already (DDP takes one, as torch's own ``register_comm_hook`` says).
        """
        if not callable(hook):
            raise InvalidArgumentError(
                f"register_comm_hook(state, hook={hook!r}): hook must be callable as "
                "hook(state, bucket) -> torch.futures.Future"
            )
        if self.user is not None:
            raise InvalidArgumentError(
                f"register_comm_hook was called already (with {_name(self.user[0])}); "
                f"DDP takes one comm hook: register {_name(hook)} once, on a fresh model"
            )
        self.user = (hook, state)


def _name(hook: Any) -> str:
    return str(getattr(hook, "__name__", None) or type(hook).__name__)


def record_bucket(state: DDPRecorder, bucket: Any) -> Any:
    """DDP's comm hook: record ``bucket``'s collective, run it, return its future."""
    code, at = _site(sys._getframe(1), state.skipped)
    buf = bucket.buffer()
    user = state.user
    op = DDP_ALL_REDUCE if user is None else f"ddp {_name(user[0])}"
    detail = f"bucket {bucket.index()} {describe((buf.shape, buf.dtype))}"
    # No lock: DDP calls this under its reducer's lock, in bucket order, while the training
    # thread is inside backward and starts no devlayer collective (module docstring).
    rec = collective_ledger().begin_at(op, detail, code, at)
    try:
        if user is not None:
            fut = user[0](user[1], bucket)
            fut.add_done_callback(functools.partial(_settled, rec))
            return fut
        buf.mul_(state.scale)
        work = state.all_reduce(buf, group=state.group, async_op=True)
        return work.get_future().then(functools.partial(_reduced, rec))
    except BaseException:
        Ledger.fail(rec)
        raise


# torch's _check_comm_hook compares the annotations of `bucket` and of the return value
# with dist.GradBucket and Future[Tensor]; ours are strings (PEP 563), so it would refuse
# the hook: it gets none (the signature above is for readers and mypy).
record_bucket.__annotations__ = {}


def _reduced(rec: list[Any], fut: Any) -> Any:
    """The reduced bucket (as torch's ``allreduce_hook`` returns it); ``rec`` settled."""
    try:
        out = fut.value()[0]
    except BaseException:
        Ledger.fail(rec)
        raise
    Ledger.done(rec)
    return out


def _settled(rec: list[Any], fut: Any) -> None:
    """Mark ``rec`` done or failed as the user's hook's future ended (never raises)."""
    try:
        fut.value()
    except BaseException:
        Ledger.fail(rec)
        return
    Ledger.done(rec)


def record_ddp(ddp: Any) -> bool:
    """Record ``ddp``'s gradient buckets in the ledger (see the module docstring).

    Args:
        ddp: A ``DistributedDataParallel`` devlayer just built (before any backward).

    Returns:
        True when the hook was registered; False when ``ddp`` is left as torch made it (a
        comm hook already there, or compiled autograd's python reducer).
    """
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    # Read with defaults: private attributes of torch's DDP, which say whether it already
    # holds a hook (mixed_precision registers one) or calls hooks per parameter.
    if getattr(ddp, "_comm_hooks", None) or getattr(ddp, "_use_python_reducer", False):
        return False
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
    recorder = DDPRecorder(ddp.process_group, dist.all_reduce, (_DEVLAYER, torch_dir))
    DistributedDataParallel.register_comm_hook(ddp, recorder, record_bucket)
    ddp.register_comm_hook = recorder.register
    return True
