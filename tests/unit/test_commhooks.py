"""The pure parts of DDP's recording comm hook (issue 22, H22-H6): no process group."""

from __future__ import annotations

import sys
import sysconfig
import threading
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from devlayer.errors import InvalidArgumentError
from devlayer.ledger import Ledger, line_of
from devlayer.train import commhooks
from devlayer.train.commhooks import DDPRecorder, record_bucket, record_ddp


class _Bucket:
    def __init__(self, buf: torch.Tensor, index: int = 1) -> None:
        self._buf, self._index = buf, index

    def buffer(self) -> torch.Tensor:
        return self._buf

    def index(self) -> int:
        return self._index


class _Group:
    def size(self) -> int:
        return 4


@pytest.fixture
def ledger(monkeypatch: pytest.MonkeyPatch) -> Ledger:
    led = Ledger(8)
    monkeypatch.setattr(commhooks, "collective_ledger", lambda: led)
    return led


def _recorder(futures: list[Any]) -> DDPRecorder:
    def all_reduce(buf: torch.Tensor, group: Any, async_op: bool) -> Any:
        assert async_op is True and isinstance(group, _Group)
        fut: torch.futures.Future[list[torch.Tensor]] = torch.futures.Future()
        futures.append((fut, buf))
        return SimpleNamespace(get_future=lambda: fut)

    return DDPRecorder(_Group(), all_reduce, (commhooks._DEVLAYER,))


def test_h22_h6_a_bucket_is_running_until_its_future_completes(ledger: Ledger) -> None:
    """H22-H6: DDP's default path through the hook: the bucket is scaled by 1/world
    (multiplied, as DDP's reducer does), one record is running until the all_reduce's
    future completes, then done, and the hook's future gives the reduced buffer; the
    record names this test's line, the first frame outside devlayer."""
    futures: list[Any] = []
    buf = torch.full((3,), 2.0)
    out = record_bucket(_recorder(futures), _Bucket(buf))
    line = sys._getframe().f_lineno - 1
    (rec,) = ledger.tail()
    assert rec["op"] == "ddp all_reduce" and rec["detail"] == "bucket 1 [3] float32"
    assert rec["state"] == "running" and rec["site"] == f"test_commhooks.py:{line}"
    assert rec["function"] == "test_h22_h6_a_bucket_is_running_until_its_future_completes"
    assert torch.equal(buf, torch.full((3,), 0.5))
    fut, sent = futures[0]
    assert sent is buf
    fut.set_result([buf])
    assert out.wait() is buf and ledger.tail()[0]["state"] == "done"


def test_h22_h6_a_failed_all_reduce_marks_its_record_failed(ledger: Ledger) -> None:
    """H22-H6: an all_reduce whose future errors (a timeout) leaves its record failed and
    the error in the future DDP waits on."""
    futures: list[Any] = []
    out = record_bucket(_recorder(futures), _Bucket(torch.ones(2)))
    futures[0][0].set_exception(RuntimeError("Timed out waiting 8000ms"))
    with pytest.raises(RuntimeError, match="Timed out"):
        out.wait()
    assert ledger.tail()[0]["state"] == "failed"


def test_h22_h6_a_users_hook_runs_with_its_future_returned_unchanged(ledger: Ledger) -> None:
    """H22-H6: a hook registered through the model's register_comm_hook is called with its
    state; its own future is returned (DDP sees exactly what it returns); the record,
    named after the hook, is done or failed as that future ends; a hook raising at once
    leaves the record failed and the error raised."""
    recorder = _recorder([])
    seen: list[Any] = []
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()

    def my_hook(state: Any, bucket: Any) -> Any:
        seen.append(state)
        return fut

    recorder.register("my state", my_hook)
    assert record_bucket(recorder, _Bucket(torch.ones(2))) is fut
    assert seen == ["my state"] and ledger.tail()[0]["op"] == "ddp my_hook"
    fut.set_result(torch.ones(2))
    assert ledger.tail()[0]["state"] == "done"
    recorder.user = (lambda state, bucket: 1 / 0, None)
    with pytest.raises(ZeroDivisionError):
        record_bucket(recorder, _Bucket(torch.ones(2)))
    assert ledger.tail()[-1]["state"] == "failed"
    failing: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    recorder.user = (lambda state, bucket: failing, None)
    record_bucket(recorder, _Bucket(torch.ones(2)))
    failing.set_exception(RuntimeError("lost"))
    assert ledger.tail()[-1]["state"] == "failed"


def test_h22_h6_register_refuses_a_second_hook_and_a_non_callable() -> None:
    """H22-H6: the model's register_comm_hook refuses what DDP refuses, naming it: a second
    hook (DDP takes one) and a hook that is not callable."""
    recorder = _recorder([])

    def first(state: Any, bucket: Any) -> Any:
        return None

    recorder.register(None, first)
    with pytest.raises(InvalidArgumentError, match=r"called already \(with first\)"):
        recorder.register(None, first)
    with pytest.raises(InvalidArgumentError, match="hook=42"):
        _recorder([]).register(None, 42)  # type: ignore[arg-type]


def test_h22_h6_torchs_signature_check_accepts_the_hook() -> None:
    """H22-H6: DDP's own check of a comm hook's annotations accepts record_bucket (its
    string annotations, from PEP 563, would be refused: they are removed)."""
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel._check_comm_hook(object(), record_bucket)  # raises on refusal


def test_h22_h6_a_ddp_with_a_hook_or_the_python_reducer_is_left_alone() -> None:
    """H22-H6: a DDP that already holds a comm hook (DDP's mixed_precision registers one)
    or runs compiled autograd's python reducer is not given devlayer's hook."""
    assert record_ddp(SimpleNamespace(_comm_hooks=[(print, None)])) is False
    assert record_ddp(SimpleNamespace(_comm_hooks=[], _use_python_reducer=True)) is False


def test_h22_h6_a_hook_on_a_thread_of_its_own_names_the_main_threads_frame() -> None:
    """H22-H6: when the hook's thread has no frame outside the skipped folders (autograd's
    device thread), the site is the main thread's first such frame: here this test,
    waiting in join() as a training loop waits in backward."""
    skipped = ("/skipped/", sysconfig.get_paths()["stdlib"])
    found: list[Any] = []
    go = threading.Event()
    space = {"sites": commhooks, "sys": sys, "found": found, "skip": skipped, "go": go}
    code = compile(
        "def target():\n    go.wait(30)\n    found.append(sites._site(sys._getframe(), skip))\n",
        "/skipped/autograd_thread.py",
        "exec",
    )
    exec(code, space)
    thread = threading.Thread(target=space["target"])
    thread.start()
    _ = (go.set(), thread.join(30))  # one line: the main thread is on it when the hook runs
    line = sys._getframe().f_lineno - 1
    (code_at,) = found
    assert code_at[0].co_name == sys._getframe().f_code.co_name
    assert line_of(*code_at) == line


def test_h22_h6_begin_at_numbers_records_with_begin() -> None:
    """H22-H6: Ledger.begin_at takes the next sequence number, shared with begin, and keeps
    the site it is given."""
    led = Ledger(4)
    led.done(led.begin("all_reduce"))
    frame = sys._getframe()
    code, at, line = frame.f_code, frame.f_lasti, frame.f_lineno
    rec = led.begin_at("ddp all_reduce", "bucket 0", code, at)
    assert [r["seq"] for r in led.tail()] == [0, 1] and rec[0] == 1
    assert led.tail()[1]["site"] == f"test_commhooks.py:{line}"
