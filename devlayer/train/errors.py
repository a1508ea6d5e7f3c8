"""Errors of the training layer that more than one of its modules raises."""

from __future__ import annotations

from devlayer.errors import DevlayerError

__all__ = ["PreemptedError"]


class PreemptedError(DevlayerError):
    """Training stopped because the job was asked to (SIGTERM): not a success.

    Every rank raises it at the same step; a checkpoint was saved first when
    ``checkpoint_dir`` is set, so the next run resumes with ``resume="auto"``. Raised by
    the Trainer's loop and, during a resume, by the checkpoint code.
    """
