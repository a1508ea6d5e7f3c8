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
from collections.abc import Sequence

from devlayer.errors import DeviceError

__all__ = ["usable_cpus", "DeviceSpec", "device_index", "narrow_visibility", "parse_devices"]

#: The parsed form: ``None`` = all visible devices, an int = the first N, a tuple = indices.
DeviceSpec = int | tuple[int, ...] | None


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
    if spec is None:
        return None
    if isinstance(spec, bool):
        raise DeviceError(f"{origin}={spec!r} is not a device spec; use 'auto', N or '1,3'")
    if isinstance(spec, int):
        if spec == -1:
            return None
        if spec < 1:
            raise DeviceError(
                f"{origin}={spec} asks for no devices; use a count >= 1, 'auto' or -1 for all "
                f"(for the device with index 0 write '0,' or '[0]')"
            )
        return spec
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text in ("", "auto", "all", "-1"):
            return None
        as_list = text.startswith("[")  # "[2]" is index 2, like [2]; "2" is a count
        text = text.strip("[]()").strip()
        if "," not in text and not as_list:
            try:
                count = int(text)
            except ValueError:
                raise DeviceError(
                    f"{origin}={spec!r} is not a device spec; use 'auto', a count such as 2, "
                    f"or indices such as '1,3'"
                ) from None
            # Outside the try: DeviceError is a ValueError, and "0" deserves its own message.
            return parse_devices(count, origin=origin)
        items: Sequence[object] = [p.strip() for p in text.split(",") if p.strip()]
    elif isinstance(spec, Sequence) and not isinstance(spec, (bytes, bytearray)):
        items = list(spec)
    else:
        raise DeviceError(
            f"{origin}={spec!r} has type {type(spec).__name__}; use 'auto', an int, "
            f"a string like '1,3' or a list of ints"
        )
    indices: list[int] = []
    for item in items:
        try:
            if isinstance(item, bool):
                raise ValueError
            # operator.index: 1.5 or 2.0 in a list is an error, not silently device 1 or 2.
            value = int(item) if isinstance(item, str) else operator.index(item)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise DeviceError(
                f"{origin}={spec!r}: entry {item!r} is not a device index (a whole number >= 0)"
            ) from None
        if value < 0:
            raise DeviceError(f"{origin}={spec!r}: device index {value} is negative")
        indices.append(value)
    if not indices:
        raise DeviceError(f"{origin}={spec!r} lists no devices; use 'auto' for all of them")
    dups = sorted({i for i in indices if indices.count(i) > 1})
    if dups:
        raise DeviceError(
            f"{origin}={spec!r} lists device {', '.join(map(str, dups))} more than once; "
            f"each device may appear once (ranks are mapped with local_rank % len(devices))"
        )
    return tuple(indices)


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
    """Raise DeviceError when ``spec`` names devices beyond ``visible_count``."""
    wanted = selected_indices(spec)
    if wanted is None:
        return
    missing = [i for i in wanted if i >= visible_count]
    if missing:
        have = f"0..{visible_count - 1}" if visible_count else "none"
        raise DeviceError(
            f"{origin}={_show(spec)} asks for {device_type} device(s) "
            f"{', '.join(map(str, missing))}, but this process sees {visible_count} "
            f"{device_type} device(s) (indices {have}); pick indices that exist or use 'auto'"
        )


def _show(spec: DeviceSpec) -> str:
    if isinstance(spec, tuple):
        return "[" + ",".join(map(str, spec)) + "]"
    return repr(spec)


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


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a SLURM task's CPUs)."""
    import os

    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
