"""Device specs, visibility narrowing and local-rank placement, as pure functions."""

from __future__ import annotations

import doctest

import pytest

import devlayer.devices
from devlayer.devices import (
    check_exists,
    device_index,
    narrow_visibility,
    parse_devices,
    selected_indices,
)
from devlayer.errors import DeviceError, DevlayerError


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        # all visible devices
        ("auto", None),
        (" AUTO ", None),
        ("all", None),
        ("", None),
        (None, None),
        (-1, None),
        ("-1", None),
        # the first N
        (2, 2),
        ("2", 2),
        (" 4 ", 4),
        (1, 1),
        # indices among the visible devices
        ("1,3", (1, 3)),
        ("1, 3", (1, 3)),
        ("[1,3]", (1, 3)),
        ("[1, 3]", (1, 3)),
        ("3,", (3,)),
        ("[2]", (2,)),  # a one-element list, not the count 2
        ("(0,)", (0,)),
        ("0,1,2,3", (0, 1, 2, 3)),
        ([1, 3], (1, 3)),
        ([3, 1], (3, 1)),  # order is kept: local rank 0 -> device 3
        ((0,), (0,)),
        ([0], (0,)),
        (["1", "3"], (1, 3)),
        (range(2), (0, 1)),
    ],
    ids=repr,
)
def test_parse_devices(spec: object, parsed: object) -> None:
    assert parse_devices(spec) == parsed


@pytest.mark.parametrize(
    ("spec", "fragments"),
    [
        (-2, ["devices=-2 asks for no devices"]),
        (0, ["devices=0 asks for no devices"]),
        ("0", ["devices=0 asks for no devices"]),
        ("-3", ["devices=-3 asks for no devices"]),
        ([0, 0], ["devices=[0, 0] lists device 0 more than once"]),
        ("1,1,2,2", ["devices='1,1,2,2' lists device 1, 2 more than once"]),
        ([1, -1], ["devices=[1, -1]: device index -1 is negative"]),
        ("1,-3", ["device index -3 is negative"]),
        ("x", ["devices='x' is not a device spec"]),
        ("1.5", ["devices='1.5' is not a device spec"]),
        ("1,a", ["entry 'a' is not a device index"]),
        (True, ["devices=True is not a device spec"]),
        (False, ["devices=False is not a device spec"]),
        ([True], ["entry True is not a device index"]),
        ([], ["devices=[] lists no devices"]),
        ((), ["devices=() lists no devices"]),
        ("[]", ["devices='[]' lists no devices"]),
        (1.5, ["devices=1.5 has type float"]),
        ([1.5], ["devices=[1.5]: entry 1.5 is not a device index"]),
        ([2.0], ["entry 2.0 is not a device index"]),
        ([None], ["entry None is not a device index"]),
        ({"a": 1}, ["has type dict"]),
        (b"1,3", ["devices=b'1,3' has type bytes"]),
        (object, ["has type type"]),
    ],
    ids=repr,
)
def test_parse_devices_errors(spec: object, fragments: list[str]) -> None:
    with pytest.raises(DeviceError) as err:
        parse_devices(spec)
    msg = str(err.value)
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"


def test_parse_devices_error_names_origin() -> None:
    with pytest.raises(DeviceError, match=r"^DEVLAYER_DEVICES='x' is not a device spec"):
        parse_devices("x", origin="DEVLAYER_DEVICES")
    with pytest.raises(DeviceError, match=r"^DEVLAYER_DEVICES='0,0' lists device 0 more"):
        parse_devices("0,0", origin="DEVLAYER_DEVICES")


def test_device_error_types() -> None:
    assert issubclass(DeviceError, DevlayerError)
    assert issubclass(DeviceError, ValueError)


@pytest.mark.parametrize(
    ("spec", "indices"),
    [(None, None), (1, (0,)), (3, (0, 1, 2)), ((1, 3), (1, 3)), ((2,), (2,))],
)
def test_selected_indices(spec: object, indices: object) -> None:
    assert selected_indices(spec) == indices  # type: ignore[arg-type]
    assert selected_indices(spec) == indices  # type: ignore[arg-type]


# --------------------------------------------------------------------------- visibility


@pytest.mark.parametrize(
    ("current", "indices", "narrowed"),
    [
        (None, [1, 3], "1,3"),
        (None, (0,), "0"),
        ("4,5,6,7", (1, 3), "5,7"),
        ("4,5,6,7", [0], "4"),
        ("4,5,6,7", [3, 0], "7,4"),
        (" 4 , 5 ", [1], "5"),
        ("GPU-aa,GPU-bb", [1], "GPU-bb"),
        ("GPU-aa,GPU-bb", [1, 0], "GPU-bb,GPU-aa"),
        ("MIG-1a2b,MIG-3c4d,MIG-5e6f", [2], "MIG-5e6f"),
        ("0.0,0.1,1.0", [1, 2], "0.1,1.0"),  # ZE_AFFINITY_MASK tile form
    ],
)
def test_narrow_visibility(current: str | None, indices: list[int], narrowed: str) -> None:
    assert narrow_visibility(current, indices) == narrowed


@pytest.mark.parametrize(
    ("current", "indices", "fragments"),
    [
        ("0,1", [2], ["device index 2 is not visible", "lists 2 device(s)", "('0,1')"]),
        ("4,5,6,7", [1, 4], ["device index 4 is not visible", "lists 4 device(s)"]),
        ("GPU-aa", [1], ["device index 1", "('GPU-aa')"]),
        ("", [0], ["device index 0 is not visible", "lists 0 device(s)"]),
    ],
)
def test_narrow_visibility_errors(current: str, indices: list[int], fragments: list[str]) -> None:
    with pytest.raises(DeviceError) as err:
        narrow_visibility(current, indices)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_spec_composes_with_scheduler_visibility() -> None:
    # The module docstring's promise: with 4,5,6,7 visible, "1,3" is physical 5 and 7.
    indices = selected_indices(parse_devices("1,3"))
    assert indices is not None
    assert narrow_visibility("4,5,6,7", indices) == "5,7"
    count = selected_indices(parse_devices(2))
    assert count is not None
    assert narrow_visibility("4,5,6,7", count) == "4,5"


# --------------------------------------------------------------------------- placement


@pytest.mark.parametrize(
    ("local_rank", "count", "index"),
    [(0, 4, 0), (3, 4, 3), (5, 4, 1), (7, 4, 3), (8, 4, 0), (7, 1, 0), (2, 3, 2), (4, 3, 1)],
)
def test_device_index(local_rank: int, count: int, index: int) -> None:
    assert device_index(local_rank, count) == index


@pytest.mark.parametrize("count", [0, -1])
def test_device_index_without_devices(count: int) -> None:
    with pytest.raises(DeviceError, match=rf"no devices are visible \(count={count}\)"):
        device_index(0, count)


# --------------------------------------------------------------------------- existence


def test_check_exists_missing_index() -> None:
    with pytest.raises(DeviceError) as err:
        check_exists((7,), 2, device_type="cuda")
    msg = str(err.value)
    assert msg.startswith("devices=[7] asks for cuda device(s) 7,")
    assert "this process sees 2 cuda device(s) (indices 0..1)" in msg
    assert "use 'auto'" in msg


def test_check_exists_count_too_large_says_a_count_was_asked() -> None:
    # Issue 13: "asks for xpu device(s) 2, 3" read as if indices 2 and 3 were asked for.
    with pytest.raises(DeviceError) as err:
        check_exists(4, 2, device_type="xpu", origin="DEVLAYER_DEVICES")
    msg = str(err.value)
    assert msg.startswith("DEVLAYER_DEVICES=4 asks for a count of 4 xpu devices,")
    assert "sees 2 xpu device(s) (indices 0..1)" in msg


def test_check_exists_no_devices() -> None:
    with pytest.raises(DeviceError, match=r"sees 0 cuda device\(s\) \(indices none\)"):
        check_exists((1, 3), 0, device_type="cuda")


@pytest.mark.parametrize(
    ("spec", "visible", "one_more"),
    [(None, 0, None), (None, 8, None), (2, 2, 3), ((0, 1), 2, (0, 2)), ((3,), 4, (4,))],
)
def test_check_exists_accepts_up_to_the_boundary(
    spec: object, visible: int, one_more: object
) -> None:
    """Each accepted spec sits at the edge: the same spec one step further is refused, so a check
    that accepted everything (or refused at the edge) fails here."""
    assert check_exists(spec, visible, device_type="cuda") is None  # type: ignore[arg-type,func-returns-value]
    if one_more is not None:
        with pytest.raises(DeviceError, match="asks for"):
            check_exists(one_more, visible, device_type="cuda")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- doctests


def test_doctests() -> None:
    result = doctest.testmod(devlayer.devices)
    assert result.attempted >= 5
    assert result.failed == 0


def test_plan_narrows_relative_to_what_the_process_sees() -> None:
    from devlayer.devices import APPLIED_MARKER, plan_devices

    env = {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    plan = plan_devices(
        (1, 3), device_type="cuda", visible=4, variable="CUDA_VISIBLE_DEVICES", env=env,
        local_rank=3, local_world_size=2,
    )  # fmt: skip
    assert (plan.value, plan.marker) == ("5,7", "CUDA_VISIBLE_DEVICES=1,3")
    assert plan.visibility(env) == ("CUDA_VISIBLE_DEVICES", "5,7")
    assert plan.device_index(visible=2) == 1  # local rank 3 on 2 devices
    # a parent applied it already: nothing to set, the current value is what the rank sees
    env = {"CUDA_VISIBLE_DEVICES": "5,7", APPLIED_MARKER: "CUDA_VISIBLE_DEVICES=1,3"}
    again = plan_devices(
        (1, 3), device_type="cuda", visible=2, variable="CUDA_VISIBLE_DEVICES", env=env
    )
    assert again.value is None and again.visibility(env) == ("CUDA_VISIBLE_DEVICES", "5,7")
    # all devices: nothing to narrow
    assert (
        plan_devices(None, device_type="cuda", visible=4, variable="X", env={}).visibility({})
        is None
    )


def test_plan_refuses_before_anything_changes() -> None:
    from devlayer.devices import plan_devices

    with pytest.raises(DeviceError, match=r"devices=\[0,1\] selects 2 device\(s\) but 4 ranks"):
        plan_devices(
            (0, 1), device_type="cuda", visible=4, variable="V", env={}, local_world_size=4
        )
    with pytest.raises(DeviceError, match="no launcher started this single process"):
        plan_devices(2, device_type="cuda", visible=4, variable="V", env={}, launched=False)
    with pytest.raises(DeviceError, match=r"asks for cuda device\(s\) 5"):
        plan_devices((5,), device_type="cuda", visible=4, variable="V", env={})
