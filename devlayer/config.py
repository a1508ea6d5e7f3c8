"""The settings object: every ``DEVLAYER_*`` variable devlayer uses, parsed once.

:meth:`Settings.from_env` is a pure function of the mapping it is given: it parses each
variable once, with the messages users know (each names the variable, the value seen and
what is accepted), and records where each value came from (the variable, or ``default``).
:meth:`Settings.given` lets an argument win over its variable, normalised by the same code,
so ``devices="1,3"`` and ``DEVLAYER_DEVICES=[1,3]`` are one request. ``init()`` reads the
environment once, here; the rest of the library receives values.

The launcher variables (``DEVLAYER_LAUNCHER``, ``DEVLAYER_DISABLE_LAUNCHERS``) are read by
launcher detection with the rest of the launcher's environment (their names are checked
against the launcher records that detection is given), and ``DEVLAYER_VISIBILITY_APPLIED``
by :mod:`devlayer.devices` beside the visibility variable it describes (devlayer's own
marker, which ``init()`` changes). This module imports no torch: :mod:`devlayer.early`
uses it before torch.

Example:
    >>> s = Settings.from_env({"DEVLAYER_DEVICES": "1,3", "DEVLAYER_TIMEOUT": "30"})
    >>> s.devices, s.timeout.total_seconds(), s.origin("devices"), s.origin("comm")
    ((1, 3), 30.0, 'DEVLAYER_DEVICES', 'default')
    >>> s.given("devices", [1, 3]) == s
    True
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

from devlayer.devices import DeviceSpec, parse_devices
from devlayer.errors import InvalidArgumentError, short_repr

__all__ = [
    "DEFAULT_PROGRESS_INTERVAL",
    "DEFAULT_TIMEOUT",
    "MAX_TIMEOUT",
    "Settings",
    "parse_flag",
    "parse_timeout",
    "short_repr",
]


DEFAULT_TIMEOUT = timedelta(minutes=10)


#: Seconds between the Trainer's plain progress lines (``DEVLAYER_PROGRESS_INTERVAL``).
DEFAULT_PROGRESS_INTERVAL = 30.0


#: The longest rendezvous/collective timeout accepted (``timeout=``, ``DEVLAYER_TIMEOUT``).
MAX_TIMEOUT = timedelta(days=7)


def parse_timeout(timeout: object, *, origin: str = "timeout") -> timedelta | None:
    """Seconds (int/float), a :class:`~datetime.timedelta` or ``None`` -> timedelta or None.

    Accepted: more than zero and at most :data:`MAX_TIMEOUT` (a week). Larger values are
    refused by name instead of overflowing inside ``timedelta`` or torch (``1e14`` raised a
    raw ``OverflowError``; ``8e13`` was accepted and then failed at once).

    Raises:
        InvalidArgumentError: Zero (or below a microsecond), negative, not finite, more than
            a week, or another type.

    Example:
        >>> parse_timeout(5)
        datetime.timedelta(seconds=5)
    """
    if timeout is None:
        return None
    shown = short_repr(timeout)  # what the user wrote (a variable's text stays text)
    if isinstance(timeout, str) and origin != "timeout":
        try:
            timeout = float(timeout)
        except ValueError:
            raise InvalidArgumentError(
                f"{origin}={shown} is not a number of seconds; use e.g. {origin}=300"
            ) from None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float, timedelta)):
        raise InvalidArgumentError(
            f"{origin}={shown} has type {type(timeout).__name__}; pass seconds as a number "
            f"or a datetime.timedelta"
        )
    if isinstance(timeout, timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, int) and abs(timeout) > 10**15:  # float() may overflow
        seconds = float(10**15 if timeout > 0 else -1)
    else:
        seconds = float(timeout)
    if not seconds > 0 or seconds == float("inf"):
        raise InvalidArgumentError(
            f"{origin}={shown} must be a positive, finite number of seconds (e.g. 300)"
        )
    limit = MAX_TIMEOUT.total_seconds()
    if seconds > limit:
        raise InvalidArgumentError(
            f"{origin}={shown} is more than a week; devlayer accepts timeouts up to "
            f"{limit:.0f} seconds (7 days). Use a smaller value, e.g. {origin}=3600"
        )
    result = timeout if isinstance(timeout, timedelta) else timedelta(seconds=seconds)
    if result <= timedelta(0):
        raise InvalidArgumentError(
            f"{origin}={shown} must be a positive number of seconds; it rounds to 0 at "
            f"microsecond resolution (e.g. use 300)"
        )
    return result


def parse_flag(raw: str, origin: str) -> bool:
    """An on/off variable's text: ``1``/``true``/``yes``/``on`` or ``0``/``false``/``no``/``off``.

    Raises:
        InvalidArgumentError: Any other text, naming ``origin`` and the value.

    Example:
        >>> parse_flag(" Yes ", "DEVLAYER_DEBUG")
        True
    """
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise InvalidArgumentError(f"{origin}={raw!r} is not a boolean; use 1 or 0")


def _backend(raw: object, origin: str) -> str | None:
    """``None`` for auto-detection (``"auto"``, any case); a name is checked at selection."""
    if isinstance(raw, str) and raw.strip().lower() in ("", "auto"):
        return None
    return raw.strip() if isinstance(raw, str) else raw  # type: ignore[return-value]


def _devices(raw: object, origin: str) -> DeviceSpec:
    """The one place a device spec is parsed: a variable's text and arguments alike."""
    return parse_devices(raw, origin=origin)


def _comm(raw: object, origin: str) -> str:
    """A comm name in lower case (``"GLOO"`` = ``"gloo"``); whether it exists is init's check."""
    if not isinstance(raw, str) or not raw.strip():
        raise InvalidArgumentError(
            f"{origin}={short_repr(raw)} is not a communication backend name; pass a name such "
            f"as 'gloo', or leave it out (None) for the backend's own"
        )
    return raw.strip().lower()


def _flag(raw: object, origin: str) -> bool:
    return parse_flag(raw, origin) if isinstance(raw, str) else bool(raw)


def _timeout(raw: object, origin: str) -> timedelta:
    parsed = parse_timeout(raw, origin=origin)
    return DEFAULT_TIMEOUT if parsed is None else parsed


def _hooks(raw: object, origin: str) -> tuple[Any, ...]:
    """``"a:b, c:d"`` -> ``("a:b", "c:d")``; an argument's hooks (callables too) as a tuple.

    The entries are imported and checked by :func:`devlayer.hooks.resolve_hooks` at init.
    """
    if isinstance(raw, str):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    return tuple(raw) if isinstance(raw, Iterable) else (raw,)


def _text(raw: object, origin: str) -> str:
    return str(raw).strip()


def _folder(raw: object, origin: str) -> str:
    """A folder path (``str`` or ``os.PathLike``), as text."""
    if isinstance(raw, (str, os.PathLike)) and str(os.fspath(raw)).strip():
        return str(os.fspath(raw)).strip()
    raise InvalidArgumentError(
        f"{origin}={short_repr(raw)} is not a folder path; pass a path such as "
        f"'/scratch/hangs', or leave it out for the default"
    )


def _watchdog(raw: object, origin: str) -> float:
    """Seconds without a completed collective before the watchdog dumps; 0 = off."""
    if isinstance(raw, str) and raw.strip().lower() in ("0", "off", "false", "no"):
        return 0.0
    if raw == 0 and not isinstance(raw, bool):
        return 0.0
    parsed = parse_timeout(raw, origin=origin)
    assert parsed is not None  # raw is not None here
    return parsed.total_seconds()


def _interval(raw: object, origin: str) -> float:
    """Seconds >= 0 (``0``: a line per micro-batch), from text or a number."""
    try:
        seconds = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int past float
        seconds = math.nan
    if isinstance(raw, bool) or not math.isfinite(seconds) or seconds < 0:
        raise InvalidArgumentError(
            f"{origin}={short_repr(raw)} is not a number of seconds >= 0; use e.g. 30 (0: a "
            f"line per micro-batch)"
        )
    return seconds


#: Each field of :class:`Settings`: its variable and the one function that normalises a
#: value for it, from the variable's text or from an argument (``origin`` names which).
_PARSERS: dict[str, tuple[str, Callable[[Any, str], Any]]] = {
    "backend": ("DEVLAYER_BACKEND", _backend),
    "devices": ("DEVLAYER_DEVICES", _devices),
    "timeout": ("DEVLAYER_TIMEOUT", _timeout),
    "comm": ("DEVLAYER_COMM", _comm),
    "set_default_device": ("DEVLAYER_SET_DEFAULT_DEVICE", _flag),
    "accelerator_hooks": ("DEVLAYER_ACCELERATOR_HOOKS", _hooks),
    "allow_shared_devices": ("DEVLAYER_ALLOW_SHARED_DEVICES", _flag),
    "debug": ("DEVLAYER_DEBUG", _flag),
    "simulate": ("DEVLAYER_SIMULATE", _text),
    "hang_dir": ("DEVLAYER_HANG_DIR", _folder),
    "hang_reports": ("DEVLAYER_HANG_REPORTS", _flag),
    "watchdog": ("DEVLAYER_WATCHDOG", _watchdog),
    "peer_watch": ("DEVLAYER_PEER_WATCH", _flag),
    "ddp_ledger": ("DEVLAYER_DDP_LEDGER", _flag),
    "progress_interval": ("DEVLAYER_PROGRESS_INTERVAL", _interval),
}


@dataclass(frozen=True)
class Settings:
    """Every ``DEVLAYER_*`` setting, typed, with where each value came from.

    Attributes:
        backend: ``DEVLAYER_BACKEND``: a backend name, or ``None`` to auto-detect.
        devices: ``DEVLAYER_DEVICES``: a parsed device spec (``None`` = all visible).
        timeout: ``DEVLAYER_TIMEOUT``: rendezvous and collective timeout (default 600 s).
        comm: ``DEVLAYER_COMM``: a process-group backend (lower case), or ``None`` for the
            backend's own.
        set_default_device: ``DEVLAYER_SET_DEFAULT_DEVICE``: make the device torch's
            default; ``None`` = on for accelerators, off on cpu.
        accelerator_hooks: ``DEVLAYER_ACCELERATOR_HOOKS``: ``"module:function"`` entries
            (an argument may give callables).
        allow_shared_devices: ``DEVLAYER_ALLOW_SHARED_DEVICES``: let ranks share a device
            with a comm that refuses it (nccl).
        debug: ``DEVLAYER_DEBUG``: check every collective's arguments across ranks.
        simulate: ``DEVLAYER_SIMULATE``: fake runtimes (``"cuda:4"``), or ``None``.
        hang_dir: ``DEVLAYER_HANG_DIR``: the folder for hang dumps (``None``: a folder per
            job under the system's temp folder, see :mod:`devlayer.hangdump`).
        hang_reports: ``DEVLAYER_HANG_REPORTS``: hang dumps on signals, timeouts and from
            the watchdog (default on; the collective ledger is always kept).
        watchdog: ``DEVLAYER_WATCHDOG``: seconds without a completed collective before a
            rank writes its dump (``None``: the collective timeout; ``0``/``off``: no
            watchdog).
        peer_watch: ``DEVLAYER_PEER_WATCH``: with hang reports on, a rank stops itself
            (dump, SIGTERM, then exit code 75) when a peer rank failed or the job's store
            is gone, under launchers that leave the other ranks running (default on; off
            under torchrun, which stops them itself; see :mod:`devlayer.peerwatch`).
        ddp_ledger: ``DEVLAYER_DDP_LEDGER``: with hang reports on, a DDP model devlayer
            builds records its gradient buckets in the collective ledger through a Python
            comm hook (default on; ``0``: DDP's own C++ path, which a Python comm hook
            costs a few per cent of a short step over; see
            :mod:`devlayer.train.commhooks`).
        progress_interval: ``DEVLAYER_PROGRESS_INTERVAL``: seconds between the Trainer's
            plain progress lines when stderr is not a terminal (``0``: one per micro-batch).
        origins: Field name -> where its value came from; see :meth:`origin`.
    """

    backend: str | None = None
    devices: DeviceSpec = None
    timeout: timedelta = DEFAULT_TIMEOUT
    comm: str | None = None
    set_default_device: bool | None = None
    accelerator_hooks: tuple[Any, ...] = ()
    allow_shared_devices: bool = False
    debug: bool = False
    simulate: str | None = None
    hang_dir: str | None = None
    hang_reports: bool = True
    watchdog: float | None = None
    peer_watch: bool = True
    ddp_ledger: bool = True
    progress_interval: float = DEFAULT_PROGRESS_INTERVAL
    origins: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str], names: Iterable[str] | None = None) -> Settings:
        """Parse the ``DEVLAYER_*`` variables in ``env`` (unset or blank: the default).

        Args:
            env: The environment, e.g. ``os.environ`` or a plain dict.
            names: Parse only these fields (a reader of one setting is not stopped by a
                bad value of another); default: all of them.

        Raises:
            DevlayerError: A malformed value (the message names the variable and value), or
                a name in ``names`` that is not a setting.
        """
        values: dict[str, Any] = {}
        for name in _PARSERS if names is None else names:
            variable, parse = _parser(name)
            raw = env.get(variable)
            if raw is not None and raw.strip():
                values[name] = parse(raw, variable)
        return cls(**values, origins={name: _PARSERS[name][0] for name in values})

    def given(self, name: str, value: object, origin: str | None = None) -> Settings:
        """These settings with an argument in place of its variable (``None`` keeps it).

        Args:
            name: The field, e.g. ``"devices"``.
            value: The argument, normalised as the variable's text is (``[1, 3]`` and
                ``"1,3"`` give one spec); ``None`` (and ``backend="auto"``): keep the
                current value and origin.
            origin: The argument's name in messages (default ``name``, e.g. ``--devices``).

        Raises:
            DevlayerError: A malformed value, named by ``origin``.
        """
        if value is None:
            return self
        origin = origin or name
        parsed = _parser(name)[1](value, origin)
        if name == "backend" and parsed is None:
            return self  # backend="auto" defers to DEVLAYER_BACKEND, as None does
        return replace(self, **{name: parsed}, origins={**self.origins, name: origin})

    def origin(self, name: str) -> str:
        """Where ``name`` came from: its variable, an argument's name, or ``"default"``."""
        _parser(name)
        return self.origins.get(name, "default")

    @staticmethod
    def variables() -> dict[str, str]:
        """Field name -> its ``DEVLAYER_*`` variable, for every setting."""
        return {name: variable for name, (variable, _) in _PARSERS.items()}


def _parser(name: str) -> tuple[str, Callable[[Any, str], Any]]:
    try:
        return _PARSERS[name]
    except KeyError:
        raise InvalidArgumentError(
            f"{name!r} is not a setting; settings: {', '.join(_PARSERS)}"
        ) from None
