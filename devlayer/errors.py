"""The exceptions devlayer raises.

Every message names the value that was seen, what was expected and how to fix it.
This module imports nothing heavy so that ``import devlayer`` stays cheap.

Hierarchy::

    DevlayerError
    ├── BackendNotFoundError      (also LookupError)
    ├── BackendUnavailableError
    ├── InitOrderError
    ├── LaunchEnvError
    ├── DeviceError               (also ValueError)
    ├── InvalidArgumentError      (also ValueError)
    ├── NotInitializedError
    ├── RendezvousError
    └── CollectiveError

    EndOfLifeWarning              (a UserWarning: a package devlayer can use is end of life)
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "BackendNotFoundError",
    "BackendUnavailableError",
    "CollectiveError",
    "DeviceError",
    "DevlayerError",
    "EndOfLifeWarning",
    "InitOrderError",
    "InvalidArgumentError",
    "LaunchEnvError",
    "NotInitializedError",
    "RendezvousError",
    "short_repr",
]


class DevlayerError(Exception):
    """Base class of every error devlayer raises on purpose."""


class EndOfLifeWarning(UserWarning):
    """A package devlayer can still use has reached its end of life; the text names the
    replacement (e.g. Intel Extension for PyTorch behind ``Trainer(optimize="ipex")``).

    A ``UserWarning``, so it is shown by default; silence it with
    ``warnings.filterwarnings("ignore", category=EndOfLifeWarning)``.
    """


class BackendNotFoundError(DevlayerError, LookupError):
    """A backend name that no registered backend has.

    Example:
        >>> err = BackendNotFoundError.for_name("cdua", ["cpu", "cuda"], origin="DEVLAYER_BACKEND")
        >>> str(err).startswith("DEVLAYER_BACKEND='cdua' is not a registered backend")
        True
    """

    @classmethod
    def for_name(
        cls,
        name: str,
        registered: Iterable[str],
        *,
        origin: str = "backend",
        comm_of: str | None = None,
    ) -> BackendNotFoundError:
        """Build the error for ``name`` with the registered names and a suggestion.

        Args:
            name: The name that was asked for.
            registered: The registered backend names.
            origin: Where the name came from (``backend``, ``DEVLAYER_BACKEND``).
            comm_of: When ``name`` is a communication backend (``nccl``), the device
                backend that uses it (the registry asks torch), to suggest instead.
        """
        names = sorted(registered)
        msg = f"{origin}={name!r} is not a registered backend; registered: {', '.join(names)}"
        close = difflib.get_close_matches(name.lower(), names, n=1, cutoff=0.5)
        if close:
            msg += f" (did you mean {close[0]!r}?)"
        if comm_of:
            msg += (
                f". {name!r} is a communication backend, not a device backend: "
                f"use backend={comm_of!r} (or comm={name.lower()!r})"
            )
        return cls(msg)

    def __str__(self) -> str:  # LookupError/KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class BackendUnavailableError(DevlayerError):
    """The backend exists but cannot run here; the message says why and what to install."""


class InitOrderError(DevlayerError):
    """A vendor runtime was initialized before devlayer could set device visibility."""


class LaunchEnvError(DevlayerError):
    """The launcher environment is inconsistent, incomplete or out of range."""


class DeviceError(DevlayerError, ValueError):
    """A device specification that cannot be satisfied on this machine."""


class InvalidArgumentError(DevlayerError, ValueError):
    """An argument with a wrong type or value (timeouts, reduce ops, ranks)."""


class NotInitializedError(DevlayerError):
    """A function that needs ``devlayer.init()`` was called before it."""


class RendezvousError(DevlayerError):
    """Ranks could not meet: the store was unreachable, the port busy, or ranks missing."""


class CollectiveError(DevlayerError):
    """A collective failed or timed out; the message names the operation and the ranks."""


def short_repr(value: object, limit: int = 40) -> str:
    """``repr(value)``, cut to about ``limit`` characters so an error message stays short.

    Example:
        >>> short_repr("x" * 100)
        "'xxxxxxxxxxxxxxxxxxx...(102 characters)"
    """
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit // 2]}...({len(text)} characters)"
