"""The one exception type for user mistakes.

Everything a user can get wrong (a path, a key, a row, a flag) raises `UserError` with one line that
names the file, the row or key, what was found and what was expected. The CLI prints it without a
traceback and exits with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on a signal after saving a checkpoint; run again to resume


class UserError(Exception):
    """A mistake in the user's input; the message is the whole report.

    `shown_elsewhere`: another process of the same launch reports this very error (rank 0, or the local
    rank 0 that found it), so this one exits with code 2 without repeating it.
    """

    def __init__(self, message: str, shown_elsewhere: bool = False) -> None:
        super().__init__(message.replace("\n", " "))
        self.shown_elsewhere = shown_elsewhere
