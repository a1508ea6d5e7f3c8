"""Values read from arguments and the environment: timeouts and on/off flags.

Pure functions of their input (the environment is passed in or read once per call); every
refusal names the argument or variable, the value seen and what is accepted.
"""

from __future__ import annotations

import os
from datetime import timedelta

from devlayer.errors import InvalidArgumentError

__all__ = ["DEFAULT_TIMEOUT", "MAX_TIMEOUT", "env_flag", "parse_timeout", "short_repr"]


DEFAULT_TIMEOUT = timedelta(minutes=10)


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


def short_repr(value: object, limit: int = 40) -> str:
    """``repr(value)``, cut to about ``limit`` characters so an error message stays short.

    Example:
        >>> short_repr("x" * 100)
        "'xxxxxxxxxxxxxxxxxxx...(102 characters)"
    """
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit // 2]}...({len(text)} characters)"


def env_flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise InvalidArgumentError(f"{name}={raw!r} is not a boolean; use 1 or 0")
