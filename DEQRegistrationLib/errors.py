"""Errors the library raises on purpose.

Every problem a user can cause (bad file, bad geometry, bad values) is an
``InputError`` with a one-line message; the CLI and the Slicer module print that
line instead of a traceback.
"""


class DEQRegError(Exception):
    """Base class of the library's own errors."""


class InputError(DEQRegError, ValueError):
    """The user's input cannot be registered; the message says why, in one line."""


class AlignmentWarning(UserWarning):
    """The linear alignment went wrong and was undone (the message says what was kept); the CLI prints
    it as one ``deqreg: warning:`` line from metrics.json instead."""


class ContrastWarning(UserWarning):
    """The pair's intensities do not fit the similarity asked for (``contrast``); the run goes on, the
    CLI prints it as one ``deqreg: warning:`` line."""
