"""The error a user can fix, shared by the packages that report one (training, checkpoints,
the network's ``model.pretrained``): the CLI prints its message as one ``error:`` line and
exits with status 2. Kept outside :mod:`tsmtrain.train` so that :mod:`tsmtrain.models` and the
file readers can raise it without importing the training package."""

from __future__ import annotations

__all__ = ["TrainingError"]


class TrainingError(RuntimeError):
    """A run cannot proceed for a reason the user can fix (named in the message)."""
