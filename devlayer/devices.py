"""Device specifications and visibility variables, as pure functions.

A *device spec* says which of the devices this process can see a job may use:

* ``"auto"``, ``None`` or ``-1``: all visible devices.
* ``N`` (an int, or a string of digits without a comma): the first N visible devices.
* ``"1,3"``, ``"[1,3]"``, ``"3,"`` or ``[1, 3]``: those indices among the visible devices.

Indices are relative to what the process already sees, so a spec composes with a
scheduler's ``CUDA_VISIBLE_DEVICES``: with ``CUDA_VISIBLE_DEVICES=4,5,6,7`` the spec
``"1,3"`` selects physical devices 5 and 7.

Each rank then uses device ``local_rank % len(selected)``, which keeps per-task binding by
a scheduler working (one visible device per task, any local rank).

Example:
    >>> parse_devices("[1,3]")
    (1, 3)
    >>> narrow_visibility("4,5,6,7", (1, 3))
    '5,7'
"""

from __future__ import annotations

import operator
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from devlayer.errors import DeviceError, short_repr

__all__ = [
    "APPLIED_MARKER",
    "DevicePlan",
    "applied_entries",
    "check_rank_count",
    "check_request",
    "usable_cpus",
    "DeviceSpec",
    "device_index",
    "narrow_visibility",
    "parse_devices",
    "plan_devices",
    "show_spec",
    "spec_text",
]

#: The parsed form: ``None`` = all visible devices, an int = the first N, a tuple = indices.
DeviceSpec = int | tuple[int, ...] | None

#: A whole number written with ASCII digits (``str.isdigit``/``int`` also accept others).
_INTEGER = re.compile(r"[+-]?[0-9]+")
#: How many values an error message lists before it only counts the rest.
_SHOWN = 5
#: Marks that visibility was already narrowed in this process tree (by devlayer.early, a
#: parent, or ``devlayer launch``), so a child does not narrow relative indices twice.
APPLIED_MARKER = "DEVLAYER_VISIBILITY_APPLIED"
#: More devices than any node has: ``devlayer.early``, which cannot ask torch how many
#: exist, refuses a larger count before building a list of that many indices.
MAX_DEVICE_COUNT = 65536


def applied_entries(env: Mapping[str, str]) -> list[str]:
    """The entries of ``DEVLAYER_VISIBILITY_APPLIED`` in ``env``: what was narrowed already.

    Each is ``variable=indices`` (``CUDA_VISIBLE_DEVICES=1,3``); read here only, beside the
    visibility variable it describes (``init()`` itself sets it, so it is no setting).

    Example:
        >>> applied_entries({"DEVLAYER_VISIBILITY_APPLIED": "CUDA_VISIBLE_DEVICES=1,3"})
        ['CUDA_VISIBLE_DEVICES=1,3']
    """
    return [entry for entry in env.get(APPLIED_MARKER, "").split(";") if entry]


def _split_entries(text: str, spec: str, origin: str) -> list[str]:
    """The comma-separated entries of ``text``; one trailing comma marks a one-entry list.

    Raises:
        DeviceError: An empty entry (``"0,,1"``, ``",1"``), which is a typo, not a device.
    """
    if not text:
        return []
    parts = [p.strip() for p in text.split(",")]
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()  # "3," and "[3,]": the index 3
    if "" in parts:
        raise DeviceError(
            f"{origin}={_short(spec)} has an empty entry between commas; list each device once, "
            f"e.g. '0,1' (one trailing comma, as in '1,', marks a single index)"
        )
    return parts


def _few(values: Sequence[int]) -> str:
    """``"3, 4, 5, 6, 7, ... (4997 in all)"``: messages stay short for long lists."""
    shown = ", ".join(map(str, values[:_SHOWN]))
    return shown if len(values) <= _SHOWN else f"{shown}, ... ({len(values)} in all)"


def _short(spec: object) -> str:
    return short_repr(spec, limit=80)


def parse_devices(spec: object, *, origin: str = "devices") -> DeviceSpec:
    """Parse a device spec (see the module docstring).

    Args:
        spec: ``"auto"``, ``None``, ``-1``, an int, ``"1,3"``, ``"[1,3]"`` or a list of ints.
        origin: Where the spec came from, for error messages (``DEVLAYER_DEVICES``).

    Returns:
        ``None`` for all devices, an int count, or a tuple of indices.

    Raises:
        DeviceError: Negative, duplicate or non-integer entries, an empty list, or a count of 0.
    """
    # One ladder over the accepted input forms, in the order a malformed spec is diagnosed;
    # each form's own checks are in the helper named for it.
    if spec is None:
        return None
    if isinstance(spec, bool):
        raise DeviceError(f"{origin}={_short(spec)} is not a device spec; use 'auto', N or '1,3'")
    if isinstance(spec, int):
        return _parse_count(spec, origin)
    if isinstance(spec, str):
        return _parse_text(spec, origin)
    if isinstance(spec, Sequence) and not isinstance(spec, (bytes, bytearray)):
        _check_length(spec, origin)
        return _parse_indices(list(spec), spec, origin)
    raise DeviceError(
        f"{origin}={_short(spec)} has type {type(spec).__name__}; use 'auto', an int, "
        f"a string like '1,3' or a list of ints"
    )


def _parse_count(count: int, origin: str) -> DeviceSpec:
    """A count of devices: ``-1`` is all of them, below 1 is an error."""
    if count == -1:
        return None
    if count < 1:
        raise DeviceError(
            f"{origin}={count} asks for no devices; use a count >= 1, 'auto' or -1 for all "
            f"(for the device with index 0 write '0,' or '[0]')"
        )
    return count


def _parse_text(spec: str, origin: str) -> DeviceSpec:
    """``"auto"``, a count (``"2"``) or indices (``"1,3"``, ``"[2]"``, ``"3,"``)."""
    text = spec.strip().lower()
    if text in ("", "auto", "all", "-1"):
        return None
    if any(ch.isdigit() and not ch.isascii() for ch in text):
        # int() accepts Arabic-Indic, full-width and other digits; a device number never
        # looks like that on purpose.
        raise DeviceError(
            f"{origin}={_short(spec)} contains non-ASCII digits; write device numbers with the "
            f"digits 0-9 (e.g. 2 or '1,3')"
        )
    as_list = text.startswith("[")  # "[2]" is index 2, like [2]; "2" is a count
    text = text.strip("[]()").strip()
    if "," in text or as_list:
        return _parse_indices(_split_entries(text, spec, origin), spec, origin)
    if not _INTEGER.fullmatch(text):
        raise DeviceError(
            f"{origin}={_short(spec)} is not a device spec; use 'auto', a count such as 2, "
            f"or indices such as '1,3'"
        )
    # DeviceError is a ValueError, and "0" deserves its own message.
    return _parse_count(int(text), origin)


def _parse_index(item: object, spec: object, origin: str) -> int:
    """One entry of a list of indices: a whole number >= 0 (digits 0-9 in a string)."""
    try:
        if isinstance(item, bool):
            raise ValueError
        # operator.index: 1.5 or 2.0 in a list is an error, not silently device 1 or 2.
        if isinstance(item, str) and not _INTEGER.fullmatch(item.strip()):
            raise ValueError
        value = int(item) if isinstance(item, str) else operator.index(item)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DeviceError(
            f"{origin}={_short(spec)}: entry {item!r} is not a device index (a whole number "
            f">= 0, digits 0-9)"
        ) from None
    if value < 0:
        raise DeviceError(f"{origin}={_short(spec)}: device index {value} is negative")
    return value


def _parse_indices(items: Sequence[object], spec: object, origin: str) -> tuple[int, ...]:
    """The entries of a list of indices, each once; at least one."""
    indices = [_parse_index(item, spec, origin) for item in items]
    if not indices:
        raise DeviceError(f"{origin}={_short(spec)} lists no devices; use 'auto' for all of them")
    dups = sorted(i for i, n in Counter(indices).items() if n > 1)  # linear, not list.count
    if dups:
        raise DeviceError(
            f"{origin}={_short(spec)} lists device {_few(dups)} more than once; "
            f"each device may appear once (ranks are mapped with local_rank % len(devices))"
        )
    return tuple(indices)


def _check_length(spec: Sequence[object], origin: str) -> None:
    """Refuse a list longer than any node's devices before copying it (``range(10**12)``)."""
    try:
        length: int | None = len(spec)
    except OverflowError:  # len(range(10**20)) does not fit in a C ssize_t
        length = None
    if length is None or length > MAX_DEVICE_COUNT:
        many = "more than 2**63" if length is None else str(length)
        raise DeviceError(
            f"{origin}={_short(spec)} lists {many} devices; no node has more than "
            f"{MAX_DEVICE_COUNT}: list the indices you mean (e.g. [0, 1]) or use 'auto'"
        )


def selected_indices(spec: DeviceSpec) -> tuple[int, ...] | None:
    """Indices among the visible devices that ``spec`` selects.

    Returns ``None`` when the spec is "all" (nothing to narrow). A count ``N`` selects
    ``0..N-1``.
    """
    if spec is None:
        return None
    if isinstance(spec, int):
        return tuple(range(spec))
    return spec


def check_exists(
    spec: DeviceSpec, visible_count: int, *, device_type: str, origin: str = "devices"
) -> None:
    """Raise DeviceError when ``spec`` names devices beyond ``visible_count``.

    A count is compared as a number, so ``devices=10**9`` never builds a list.
    """
    if spec is None:
        return
    have = f"indices 0..{visible_count - 1}" if visible_count else "indices none"
    if isinstance(spec, int):
        if spec > visible_count:
            raise DeviceError(
                f"{origin}={spec} asks for a count of {spec} {device_type} devices, but this "
                f"process sees {visible_count} {device_type} device(s) ({have}); ask for at "
                f"most {visible_count}, or use 'auto' for all of them"
            )
        return
    missing = [i for i in spec if i >= visible_count]
    if missing:
        raise DeviceError(
            f"{origin}={show_spec(spec)} asks for {device_type} device(s) {_few(missing)}, but "
            f"this process sees {visible_count} {device_type} device(s) ({have}); pick indices "
            f"that exist or use 'auto'"
        )


def show_spec(spec: DeviceSpec) -> str:
    """A parsed spec as users write it (``[1,3]``, ``2``), cut short for long lists.

    Example:
        >>> show_spec((1, 3)), show_spec(2), show_spec(tuple(range(100)))
        ('[1,3]', '2', '[0,1,2,3,4,...] (100 entries)')
    """
    if isinstance(spec, tuple):
        if len(spec) > _SHOWN:
            return "[" + ",".join(map(str, spec[:_SHOWN])) + f",...] ({len(spec)} entries)"
        return "[" + ",".join(map(str, spec)) + "]"
    return repr(spec)


def spec_text(spec: DeviceSpec) -> str:
    """A parsed spec written out in full, as ``DEVLAYER_DEVICES`` takes it back.

    Example:
        >>> spec_text(None), spec_text(2), spec_text((3,)), spec_text((1, 3))
        ('auto', '2', '3,', '1,3')
        >>> parse_devices(spec_text((3,))) == (3,)
        True
    """
    if spec is None:
        return "auto"
    if isinstance(spec, int):
        return str(spec)
    return ",".join(map(str, spec)) + ("," if len(spec) == 1 else "")


def narrow_visibility(current: str | None, indices: Sequence[int]) -> str:
    """The new value of a visibility variable that keeps only ``indices`` of ``current``.

    Args:
        current: The variable's present value (``None`` = unset = every device).
        indices: Indices among the currently visible devices.

    Returns:
        A comma-separated value for the same variable.

    Raises:
        DeviceError: An index beyond the entries ``current`` lists.

    Example:
        >>> narrow_visibility(None, [1, 3])
        '1,3'
        >>> narrow_visibility("GPU-aa,GPU-bb", [1])
        'GPU-bb'
    """
    if current is None:
        return ",".join(str(i) for i in indices)
    # An empty value hides every device (CUDA_VISIBLE_DEVICES=""); it is not "unset".
    entries = [e.strip() for e in current.split(",") if e.strip()]
    out = []
    for i in indices:
        if i >= len(entries):
            raise DeviceError(
                f"device index {i} is not visible: the visibility variable lists "
                f"{len(entries)} device(s) ({current!r})"
            )
        out.append(entries[i])
    return ",".join(out)


def device_index(local_rank: int, visible_count: int) -> int:
    """The device a rank uses: ``local_rank % visible_count``.

    Example:
        >>> device_index(5, 4)
        1
    """
    if visible_count < 1:
        raise DeviceError(f"no devices are visible (count={visible_count}); cannot place a rank")
    return local_rank % visible_count


@dataclass(frozen=True)
class DevicePlan:
    """Which devices one rank uses, decided once by :func:`plan_devices` before any change.

    ``init()`` applies it (sets ``variable=value`` and the marker, unless a parent already
    did) and then binds the rank with :meth:`device_index`.

    Attributes:
        spec: The parsed device spec.
        origin: Where it came from (``devices`` or ``DEVLAYER_DEVICES``), for messages.
        indices: The selected indices among the visible devices; ``None`` = all of them.
        variable: The vendor's visibility variable, when the spec narrows it.
        value: Its new value; ``None`` when there is nothing to set (no narrowing, or a
            parent process already narrowed it: then ``variable`` still names it).
        marker: The entry for ``DEVLAYER_VISIBILITY_APPLIED`` that goes with ``value``.
        local_rank: The rank on this node that the plan binds.
        visible: Devices the backend saw before any narrowing (asked once, here).

    Example:
        >>> plan = plan_devices((1, 3), device_type="cuda", visible=4,
        ...                     variable="CUDA_VISIBLE_DEVICES", env={}, local_rank=1)
        >>> plan.variable, plan.value, plan.device_index(visible=2)
        ('CUDA_VISIBLE_DEVICES', '1,3', 1)
    """

    spec: DeviceSpec
    origin: str
    indices: tuple[int, ...] | None
    variable: str | None
    value: str | None
    marker: str | None
    local_rank: int
    visible: int = 0

    def visibility(self, env: Mapping[str, str]) -> tuple[str, str] | None:
        """``(variable, value)`` as the rank will see it, or ``None`` when not narrowed."""
        if self.variable is None:
            return None
        return (self.variable, self.value if self.value is not None else env.get(self.variable, ""))

    def device_index(self, visible: int) -> int:
        """The device this rank binds among the ``visible`` ones after narrowing."""
        return device_index(self.local_rank, visible)


def plan_devices(
    spec: DeviceSpec,
    *,
    device_type: str,
    visible: int,
    variable: str | None,
    env: Mapping[str, str],
    local_rank: int = 0,
    local_world_size: int = 1,
    indexed: bool = True,
    launched: bool = True,
    origin: str = "devices",
) -> DevicePlan:
    """Check a parsed spec against what this process sees and plan the visibility change.

    Pure: it reads ``env`` and changes nothing, so every check runs before ``init()``
    changes anything.

    Args:
        spec: The parsed spec (:func:`parse_devices`).
        device_type: ``cuda``, ``xpu``..., for messages.
        visible: How many devices this process sees before narrowing.
        variable: The vendor's visibility variable (``None``: the vendor has none, e.g.
            cpu and mps, where only "device 0" makes sense).
        env: The environment (its current ``variable`` value and ``DEVLAYER_VISIBILITY_APPLIED``).
        local_rank: This rank on its node.
        local_world_size: Ranks on this node: an indexed backend needs a device for each.
        indexed: Whether the backend's devices have indices (``cuda:1``; not ``mps``).
        launched: Whether a launcher started this process (``devices=2`` needs one).
        origin: Where the spec came from, for messages.

    Returns:
        The :class:`DevicePlan`.

    Raises:
        DeviceError: Devices that do not exist, a count > 1 without a launcher, or fewer
            selected devices than ranks on this node.
    """
    if isinstance(spec, int):  # a count is checked as a number before any list is built
        _check_launched_for_count(spec, visible, device_type, launched, origin)
        if not indexed:  # ranks share the one unindexed device: the count is of ranks
            check_rank_count(spec, local_world_size, device_type=device_type, origin=origin)
            return DevicePlan(spec, origin, None, None, None, None, local_rank, visible)
        check_exists(spec, visible, device_type=device_type, origin=origin)
    indices = selected_indices(spec)
    if indices is None:
        return DevicePlan(spec, origin, None, None, None, None, local_rank, visible)
    marker = None if variable is None else f"{variable}={','.join(map(str, indices))}"
    applied = marker is not None and marker in applied_entries(env)
    if not applied:  # after a parent narrowed it, the indices are relative to its old value
        check_exists(spec, visible, device_type=device_type, origin=origin)
    if indexed and len(indices) < local_world_size:
        raise DeviceError(
            f"{origin}={show_spec(spec)} selects {len(indices)} device(s) but "
            f"{local_world_size} ranks run on this node; list at least {local_world_size} "
            f"devices or start fewer ranks per node"
        )
    if variable is None or applied:
        return DevicePlan(spec, origin, indices, variable, None, None, local_rank, visible)
    value = narrow_visibility(env.get(variable), indices)
    return DevicePlan(spec, origin, indices, variable, value, marker, local_rank, visible)


def check_rank_count(count: int, ranks: int, *, device_type: str, origin: str) -> None:
    """On a backend without device indices (cpu, mps) a count is a number of ranks.

    Every rank uses the one device there, so ``devices=2`` under two ranks is what the
    user asked for; any other number of ranks on this node is a disagreement, not a guess.

    Raises:
        DeviceError: ``count`` differs from ``ranks``, the ranks on this node.

    Example:
        >>> check_rank_count(2, 2, device_type="cpu", origin="devices")
    """
    if count == ranks:
        return
    raise DeviceError(
        f"{origin}={count} asks for {count} rank(s) on this node (on {device_type} a count is "
        f"one rank each, sharing the one {device_type} device), but {ranks} rank(s) run on "
        f"this node; start {count} rank(s) per node, or set {origin}={ranks} or 'auto'"
    )


def check_request(
    spec: DeviceSpec, *, device_type: str, visible: int, indexed: bool, origin: str
) -> None:
    """The check ``init()``, ``devlayer launch`` and ``devlayer farm`` all make first.

    Indices must exist among the ``visible`` devices on every backend (``"1,3"`` on the
    one cpu device is an error everywhere, never ignored); a count is checked as devices on
    an indexed backend and left to :func:`check_rank_count` on one without indices.

    Raises:
        DeviceError: Indices (or, on an indexed backend, a count) beyond ``visible``.

    Example:
        >>> check_request(2, device_type="cpu", visible=1, indexed=False, origin="--devices")
    """
    if isinstance(spec, int) and not indexed:
        return
    check_exists(spec, visible, device_type=device_type, origin=origin)


def _check_launched_for_count(
    count: int, visible: int, device_type: str, launched: bool, origin: str
) -> None:
    """Refuse ``devices=N`` (N > 1) in a process that no launcher started.

    Lightning-style ``devices=2`` means two ranks; a plain ``python script.py`` is one rank
    and would quietly use one device. Starting ranks from inside ``init()`` would surprise
    more than an error that says how to start them.
    """
    if count < 2 or launched:
        return
    raise DeviceError(
        f"{origin}={count} asks for a count of {count} devices, one per rank, but no launcher "
        f"started this single process, so it would use one (it sees {visible} "
        f"{device_type} device(s)). Start N ranks with devlayer.spawn(fn, nprocs=N), "
        f"`devlayer launch --nproc N script.py` or `torchrun --nproc-per-node=N script.py`; "
        f"for one process use devices=1 or an index such as '1,'"
    )


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a SLURM task's CPUs)."""
    import os

    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
