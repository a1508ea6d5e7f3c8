"""Hangs in a DataLoader worker and inside a checkpoint save, on real gloo ranks (issue 22):
each ends within the timeout plus 30 s with a report naming the rank and where it is."""

from __future__ import annotations

from pathlib import Path

import pytest

import devlayer
from devlayer.hangreport import read_dumps

pytestmark = [pytest.mark.dist]

#: The collective timeout of these jobs; each must end by this plus 30 s (the bound the
#: spawn's join timeout below enforces on top of the machine's load).
TIMEOUT = 8


def _spawn_failing(fn: object, tmp_path: Path, *args: object) -> str:
    with pytest.raises(devlayer.RankFailedError) as info:
        devlayer.spawn(
            fn,  # type: ignore[arg-type]
            nprocs=2,
            args=args,
            backend="cpu",
            timeout=TIMEOUT,
            join_timeout=150,
            env={"DEVLAYER_WATCHDOG": "3", "DEVLAYER_HANG_DIR": str(tmp_path / "hangs")},
        )
    return str(info.value)


@pytest.mark.timeout(240)
def test_h22_22_a_rank_stuck_in_a_dataloader_worker_is_named(clean_env, tmp_path) -> None:
    """H22-22: rank 1's DataLoader worker blocks in ``__getitem__`` while rank 0 waits in
    all_reduce: rank 0's error names rank 1, the collective it has not entered, the loop's
    line, that its main thread waits on a DataLoader, and the worker's pid, which rank 1's
    dump holds too (not rank 1's own pid)."""
    from tests.dist.hang_places_worker import dataloader_worker_stuck

    text = _spawn_failing(dataloader_worker_stuck, tmp_path)
    assert "rank 1 has not entered all_reduce #" in text, text
    assert "; it is in dataloader_worker_stuck at " in text, text
    assert "hang_places_worker.py:" in text.split("dataloader_worker_stuck at ")[1]
    assert ", waiting on a DataLoader (worker pids: " in text, text
    reports, _ = read_dumps(tmp_path / "hangs")
    assert 1 in reports, sorted((tmp_path / "hangs").iterdir())
    workers = reports[1]["waits_on"]["workers"]
    assert len(workers) == 1 and workers[0] != reports[1]["pid"], reports[1]["waits_on"]
    assert f"worker pids: {workers[0]})" in text


@pytest.mark.timeout(240)
def test_h22_23_a_rank_blocked_in_a_synchronous_checkpoint_save_is_named(
    clean_env, tmp_path
) -> None:
    """H22-23: rank 0 blocks inside torch.save during the Trainer's synchronous checkpoint
    save while rank 1 waits for the outcome: rank 1's error names rank 0 and the blocking
    function with its file and line."""
    from tests.dist.hang_places_worker import save_hangs

    text = _spawn_failing(save_hangs, tmp_path, str(tmp_path / "ckpt"), False)
    assert "rank 0 has not entered broadcast_object #" in text, text
    assert "; it is in slow_save at hang_places_worker.py:" in text, text


@pytest.mark.timeout(240)
def test_h22_23_a_rank_blocked_in_the_background_checkpoint_writer_is_named(
    clean_env, tmp_path
) -> None:
    """H22-23: with ``checkpoint_async=True`` rank 0's background writer blocks inside
    torch.save; at the next save rank 0's main thread waits for the writer while rank 1
    waits in the ranks' agreement: rank 1's error names rank 0, that it waits for the
    writer thread, and the writer's function with its file and line."""
    from tests.dist.hang_places_worker import save_hangs

    text = _spawn_failing(save_hangs, tmp_path, str(tmp_path / "ckpt"), True)
    assert "rank 0 has not entered all_reduce #" in text, text
    assert ", waiting for thread devlayer-checkpoint-2 (in slow_save at hang_places_worker.py:" in (
        text
    ), text


@pytest.mark.timeout(240)
def test_h22_26_ddp_own_timeout_in_the_trainer_carries_the_hang_report(clean_env, tmp_path) -> None:
    """H22-26: rank 1 hangs in its training_step (so it skips that backward) while rank 0
    waits in DDP's own gradient all_reduce, whose timeout raises torch's RuntimeError:
    the Trainer raises a CollectiveError that names the gradient reduction, keeps torch's
    message (and error, as the cause) and carries the hang report naming rank 1 in
    stuck_in_user_code with its line.

    H22-H5: DDP's bucket all_reduce is in the ledger, so the report names it: rank 1 has
    not entered ``ddp all_reduce #3`` (its last record is step 3's, at the line that called
    ``fit``), and rank 0 waited in ``ddp all_reduce #3`` with the bucket's signature at
    that same line of its function until it failed."""
    from tests.dist.hang_worker import trainer_stuck_in_step

    text = _spawn_failing(trainer_stuck_in_step, tmp_path)
    assert "CollectiveError: the gradient reduction in backward" in text, text[-3000:]
    assert "failed on rank 0 of 2 (gloo): " in text and "Timed out" in text, text[-3000:]
    assert "Hang report:" in text, text[-3000:]
    fit = f"hang_worker.py:{_line_of('trainer.fit(data)')}"
    assert (
        "rank 1 has not entered ddp all_reduce #3; it is in stuck_in_user_code at "
        f"hang_worker.py:{_line_of('time.sleep(0.05)')} (last collective: ddp all_reduce #2 "
        f"bucket 0 [5] float32 at {fit}, done)"
    ) in text, text[-3000:]
    assert f"rank 0 waited in ddp all_reduce #3 bucket 0 [5] float32 at {fit} until it failed" in (
        text
    ), text[-3000:]
    assert "The above exception was the direct cause" in text


def _line_of(snippet: str) -> int:
    """The line of ``snippet`` in tests/dist/hang_worker.py (its first occurrence)."""
    from tests.dist import hang_worker

    lines = Path(hang_worker.__file__).read_text().splitlines()
    return next(i for i, text in enumerate(lines, 1) if snippet in text)
