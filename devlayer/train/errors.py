"""Errors (and the warnings) of the training layer, shared by its modules."""

from __future__ import annotations

from devlayer.errors import DevlayerError

__all__ = [
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointInUseError",
    "CheckpointRunError",
    "CheckpointVersionError",
    "CheckpointWarning",
    "CheckpointWorldSizeError",
    "LoggerError",
    "LoggerExtraMissingError",
    "LoggerWarning",
    "WorldSizeChangeError",
    "WorldSizeChangeWarning",
    "PreemptedError",
]


class PreemptedError(DevlayerError):
    """Training stopped because the job was asked to (SIGTERM): not a success.

    Every rank raises it at the same step; a checkpoint was saved first when
    ``checkpoint_dir`` is set, so the next run resumes with ``resume="auto"``. Raised by
    the Trainer's loop and, during a resume, by the checkpoint code.
    """


class CheckpointError(DevlayerError):
    """A checkpoint could not be written, found or read; the message names the path."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint is incomplete, damaged, or holds objects that would run code on load."""


class CheckpointVersionError(CheckpointError):
    """A checkpoint was written in a newer format than this devlayer reads."""


class CheckpointWorldSizeError(CheckpointError):
    """A checkpoint was saved with a different number of ranks than this run has."""


class WorldSizeChangeError(CheckpointWorldSizeError):
    """A resume at another world size cannot continue the run exactly (the global batch
    does not split, or the training data's position cannot be carried); the message
    names what was seen and the fix."""


class WorldSizeChangeWarning(UserWarning):
    """``allow_world_size_change`` is set where the job cannot change its world size as
    asked (torchrun's shared store cannot grow back); the message names the setting
    that says so, why, and the fix."""


class CheckpointInUseError(CheckpointError):
    """Another job (or another store in this process) holds the checkpoint folder's lock."""


class CheckpointRunError(CheckpointError):
    """The folder holds checkpoints of another run than the one this job would continue."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped or only partly restored; the message says which and why."""


class LoggerError(DevlayerError):
    """A training logger (``Trainer(loggers=...)``) cannot be built or opened; the message
    names the logger, what went wrong and the fix."""


class LoggerExtraMissingError(LoggerError, ImportError):
    """A logger needs a package that is not installed; the message names the extra to
    install (``pip install 'devlayer[tensorboard]'``)."""


class LoggerWarning(UserWarning):
    """A logger failed while training ran: it is dropped for the rest of the run (the
    training, its history and the other loggers go on); the message names it and why."""
