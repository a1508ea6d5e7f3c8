"""When the Trainer saves (issue 21, item 2): the triggers in one object, without a process."""

from __future__ import annotations

from pathlib import Path

from devlayer.train.checkpointing import Checkpointer
from devlayer.train.strategy import from_name


def _checkpointer(directory, every):
    return Checkpointer(
        directory,
        every=every,
        resume="auto",
        allow_world_size_change=False,
        strategy=from_name("ddp"),
    )


def test_a21_t7_checkpoint_triggers_in_one_object():
    """A21-T7: every ``every`` steps (not when the epoch-end save follows at once), at each
    epoch end with ``every`` set, at the run's end, on preemption; nothing without a folder."""
    c = _checkpointer(Path("ck"), 2)
    assert [s for s in range(1, 7) if c.after_step(s, last_of_epoch=False, last_step=False)] == [
        2,
        4,
        6,
    ]
    assert not c.after_step(4, last_of_epoch=True, last_step=False)
    assert not c.after_step(4, last_of_epoch=False, last_step=True)
    assert c.after_epoch(finished=False) and c.on_preemption()
    at_end = _checkpointer(Path("ck"), None)
    assert not at_end.after_step(2, last_of_epoch=False, last_step=False)
    assert not at_end.after_epoch(finished=False) and at_end.after_epoch(finished=True)
    none = _checkpointer(None, None)
    assert not none.after_epoch(finished=True) and not none.on_preemption()
    assert none.begin() is None
