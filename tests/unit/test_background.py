"""The background-save helpers (issue 24) without processes: staging, sizes, errors."""

from __future__ import annotations

import errno
from collections import OrderedDict, defaultdict, namedtuple

import torch

from devlayer.train.background import FAILED, OK, Background, describe_error, stage, staged_bytes
from devlayer.train.errors import CheckpointError


def test_c24_8_a_staged_payload_does_not_follow_later_in_place_changes():
    """C24-8: stage() copies every tensor (nested in dicts, lists, tuples, namedtuples) into
    memory of its own, keeps OrderedDict as one, turns other mapping types (defaultdict) into
    plain dicts, and shares immutable values; staged_bytes() counts the tensor bytes."""
    pair = namedtuple("pair", "a b")
    w = torch.zeros(3)
    live = {
        "model": OrderedDict(w=w),
        "opt": defaultdict(list, state=[torch.ones(2)]),
        "hist": [{"loss": 0.5}],
        "t": pair(torch.zeros(1), 7),
    }
    copy = stage(live, pin=False)
    w.add_(1)
    live["opt"]["state"][0].mul_(5)
    live["t"].a.add_(2)
    assert copy["model"]["w"].tolist() == [0.0, 0.0, 0.0]
    assert copy["opt"]["state"][0].tolist() == [1.0, 1.0]
    assert copy["t"].a.tolist() == [0.0] and copy["t"].b == 7 and type(copy["t"]) is pair
    assert type(copy["model"]) is OrderedDict and type(copy["opt"]) is dict
    assert copy["model"]["w"].data_ptr() != w.data_ptr()
    assert staged_bytes(copy) == (3 + 2 + 1) * 4


def test_c24_8_a_failed_writer_reports_its_error_with_the_errno_name():
    """C24-8: a writer that raises is FAILED (not RUNNING, not lost) and its error names the
    errno (ENOSPC) found anywhere in the exception's chain."""

    def full_disk() -> None:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise CheckpointError("could not write checkpoint step 4") from exc

    bg = Background()
    bg.start(4, full_disk)
    assert bg.join(60) and bg.status() == FAILED
    assert bg.error is not None and bg.error.endswith("(ENOSPC)"), bg.error
    assert "could not write checkpoint step 4" in bg.error
    bg.clear()
    bg.start(6, lambda: None)
    assert bg.join(60) and bg.status() == OK and bg.error is None
    assert describe_error(ValueError("x")) == "ValueError: x"


def test_c24_10_staging_copies_into_the_previous_copy_where_it_fits():
    """C24-10: stage(..., into=previous) copies each tensor into the previous save's copy
    where the shape and dtype match (no new memory for a payload of the same layout, nested
    containers included), allocates where they do not, and the result still holds the
    values of this call, not later ones."""
    w, m = torch.zeros(4), torch.ones(2, 2)
    live = {"model": OrderedDict(w=w), "opt": [{"m": m, "step": 3}], "t": (torch.zeros(1),)}
    first = stage(live, pin=False)
    w.add_(1)
    second = stage(live, pin=False, into=first)
    w.add_(1)
    assert second["model"]["w"].data_ptr() == first["model"]["w"].data_ptr()
    assert second["opt"][0]["m"].data_ptr() == first["opt"][0]["m"].data_ptr()
    assert second["t"][0].data_ptr() == first["t"][0].data_ptr()
    assert second["model"]["w"].tolist() == [1.0] * 4 and second["opt"][0]["step"] == 3
    assert type(second["model"]) is OrderedDict and type(second["t"]) is tuple
    grown = {"model": OrderedDict(w=torch.zeros(5)), "opt": [{"m": m.double()}], "t": ()}
    third = stage(grown, pin=False, into=second)  # another layout: fresh memory, right values
    assert third["model"]["w"].shape == (5,) and third["opt"][0]["m"].dtype == torch.float64
    assert third["model"]["w"].data_ptr() != second["model"]["w"].data_ptr()
    assert third["opt"][0]["m"].tolist() == [[1.0, 1.0], [1.0, 1.0]]
