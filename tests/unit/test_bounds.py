"""The stop bounds of a run in one object (issue 21, item 2), tested without a process."""

from __future__ import annotations

from devlayer.train.bounds import Bounds
from devlayer.train.callbacks import EarlyStopping


def _bounds(**kw):
    args = {"max_epochs": None, "max_steps": None, "early_stopping": None}
    args.update(kw)
    return Bounds(preempt_check_every=10, **args)


def test_a21_t6_bounds_decide_the_stop_steps_first_and_record_it():
    """A21-T6: ``Bounds`` decides alone when a run stops: no bound means one epoch;
    ``max_steps`` wins over ``max_epochs`` when both are reached; early stopping counts
    completed epochs only; the reason goes into the epoch's metrics and the last line."""
    assert _bounds().max_epochs == 1 and _bounds(max_steps=4).max_epochs is None
    both = _bounds(max_epochs=2, max_steps=8)
    assert both.reached(epoch=1, step=7) is None
    assert both.reached(epoch=2, step=8) == "max_steps"
    assert both.reached(epoch=2, step=7) == "max_epochs"
    assert both.last_step(8) and not both.last_step(7)
    stopper = EarlyStopping(monitor="val_loss", mode="min", target=1.0, patience=1)
    es = _bounds(max_epochs=5, early_stopping=stopper)
    assert es.start(epoch=0, step=0, resumed_from=None) is None
    partial = {"val_loss": 0.5}
    assert es.end_epoch(partial, completed=False, epoch=0, step=3) is None
    assert "stopped_by" not in partial and not es.stopped_early
    metrics = {"val_loss": 0.5}
    assert es.end_epoch(metrics, completed=True, epoch=1, step=4) == "early_stopping"
    assert metrics["stopped_by"] == "early_stopping" and es.stopped_early
    history = [{"epoch": 1}]
    line = es.summary(history, epoch=1, step=4, resumed_from=None)
    assert (
        line == "stopped: early stopping on val_loss at step 4, epoch 1; max_epochs=5 not reached"
    )
    assert both.step_text(3) == "step 3/8" and both.epoch_text(0) == "epoch 1/2"
