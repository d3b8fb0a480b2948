"""The one base of every error a user can fix: :class:`UserError`. It carries the list of
problems found (each one line naming its culprit: file and line, recipe key, option, index
entry); the CLI catches this one type, prints each problem as an ``error:`` line and exits with
status 2. Kept at the top of the package, importing nothing, so that every package (the
networks, the file readers, the torch-free scaling code) can raise one.

Errors that are not the user's to fix (a bug, a lost node) are not :class:`UserError`: they
end the process with a traceback. Four exceptions are internal signals, caught where they are
raised and never shown as such: :class:`~tsmtrain.data.decoding.VideoDecodeError` and
:class:`~tsmtrain.data.readers.tar.SampleError` (one unreadable video or sample: the loader
replaces it and counts it) and ``prep.encode``'s ``_SourceError`` and ``_Abort`` (a source that
cannot be prepared is recorded as failed; a full disk stops the task as a
:class:`~tsmtrain.prep.encode.PrepareError`).
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["UserError", "TrainingError"]


class UserError(Exception):
    """A mistake the user can fix, with every problem found.

    Args:
        problems: one line per problem (or one string, or an iterable of objects whose
            ``str()`` is the line); at least one.

    Attributes:
        problems: the problems as given (strings, or richer objects such as the recipe's
            :class:`~tsmtrain.recipe.problems.Problem`); ``str(error)`` joins their lines.
    """

    def __init__(self, problems: str | Iterable[object] = ()):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    def lines(self) -> list[str]:
        """One line per problem, as the CLI prints them after ``error:``."""
        return [line for p in self.problems for line in str(p).splitlines() if line.strip()] or [type(self).__name__]


class TrainingError(UserError):
    """A run cannot proceed for a reason the user can fix (named in the message)."""
