"""A per-device task farm: many independent one-device jobs over the visible devices.

PtyRAD's "hypertune" pattern: a queue of jobs, each using exactly one device, run one per
device at a time. Every child sees only its device (the vendor's visibility variable is
narrowed to it), so the job script needs no device logic. On the CPU, ``parallel`` jobs run
side by side and the cores are split between them (``OMP_NUM_THREADS``).

Example:
    >>> import sys
    >>> from devlayer.farm import farm
    >>> results = farm([[sys.executable, "-c", "print('hi')"]] * 2, backend="cpu", parallel=2)
    >>> [r.returncode for r in results]
    [0, 0]

``devlayer.farm`` is this module (not callable); the queue is :func:`devlayer.farm.farm`.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from devlayer.config import Settings
from devlayer.devices import narrow_visibility, selected_indices, usable_cpus
from devlayer.errors import InvalidArgumentError

__all__ = ["FarmResult", "farm", "plan_slots"]


@dataclass(frozen=True)
class FarmResult:
    """What happened to one job."""

    index: int
    command: tuple[str, ...]
    slot: str
    returncode: int
    seconds: float


def plan_slots(
    backend: str | None = None,
    devices: object = None,
    parallel: int | None = None,
    env: Mapping[str, str] | None = None,
) -> list[tuple[str, dict[str, str]]]:
    """The worker slots: (label, environment changes) for each device (or CPU share).

    ``devices`` follows the rule of ``init(devices=...)``: indices must exist on every
    backend (``"1,3"`` on the one cpu device is a ``DeviceError``); on a backend without
    device indices a count is the number of jobs side by side, as it is of ranks there.

    Raises:
        DeviceError: Device indices that are not visible.
    """
    from devlayer.devices import check_request
    from devlayer.registry import select_backend

    env = dict(os.environ) if env is None else dict(env)
    be = select_backend(backend, env=env).backend
    base = {"DEVLAYER_BACKEND": be.name}
    var = be.visibility_var(env)
    spec = Settings().given("devices", devices).devices
    count = be.device_count()
    check_request(
        spec, device_type=be.device_type, visible=count, indexed=be.indexed, origin="devices"
    )
    if be.indexed and var is not None:
        indices = selected_indices(spec) or tuple(range(count))
        if parallel is not None and parallel < len(indices):
            indices = indices[:parallel]
        return [
            (f"{be.device_type}:{i}", {**base, var: narrow_visibility(env.get(var), [i])})
            for i in indices
        ]
    slots = parallel or (spec if isinstance(spec, int) else usable_cpus())
    if isinstance(spec, int):
        slots = min(slots, spec)
    if slots < 1:
        raise InvalidArgumentError(f"parallel={parallel!r} must be >= 1")
    threads = str(max(usable_cpus() // slots, 1))
    return [(f"{be.device_type}#{i}", {**base, "OMP_NUM_THREADS": threads}) for i in range(slots)]


def farm(
    commands: Sequence[Sequence[str]],
    *,
    backend: str | None = None,
    devices: object = None,
    parallel: int | None = None,
    env: Mapping[str, str] | None = None,
    poll: float = 0.05,
) -> list[FarmResult]:
    """Run ``commands`` (argv lists), each on one device, as many at once as there are slots.

    Args:
        commands: One argv list per job.
        backend: Which backend's devices to spread over (default: auto-detect).
        devices: Which devices (``"auto"``, ``"0,1"``...; default all visible).
        parallel: At most this many jobs at once (CPU: default = cores).
        env: Base environment for the children (default ``os.environ``).
        poll: Seconds between checks for finished jobs.

    Returns:
        One :class:`FarmResult` per job, in job order.
    """
    base_env = dict(os.environ if env is None else env)
    base_env.pop("DEVLAYER_DEVICES", None)  # each child sees exactly its one device
    slots = plan_slots(backend, devices, parallel, base_env)
    pending = list(enumerate(commands))
    free = list(range(len(slots)))
    running: dict[int, tuple[int, subprocess.Popen[bytes], float]] = {}
    results: dict[int, FarmResult] = {}
    while pending or running:
        while pending and free:
            slot = free.pop(0)
            index, argv = pending.pop(0)
            label, changes = slots[slot]
            child_env = {
                **base_env,
                **changes,
                "DEVLAYER_FARM_JOB": str(index),
                "DEVLAYER_FARM_SLOT": label,
            }
            proc = subprocess.Popen(list(argv), env=child_env)
            running[slot] = (index, proc, time.monotonic())
        for slot, (index, proc, started) in list(running.items()):
            code = proc.poll()
            if code is None:
                continue
            del running[slot]
            free.append(slot)
            results[index] = FarmResult(
                index, tuple(commands[index]), slots[slot][0], code, time.monotonic() - started
            )
        if running:
            time.sleep(poll)
    return [results[i] for i in range(len(commands))]
