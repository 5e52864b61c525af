"""Errors that the command-line tools turn into a message and exit code 2."""

from __future__ import annotations


class HeartsegError(Exception):
    """A problem with the user's input or files, reported without a traceback."""

    exit_code = 2

    def __str__(self) -> str:
        # Messages often quote other libraries' errors, which may span lines; a report is one line.
        return " ".join(line.strip() for line in super().__str__().splitlines() if line.strip())


class InputError(HeartsegError):
    """A scan, label or folder that cannot be used as given."""


class ModelError(HeartsegError):
    """A model file that is missing, unreadable or lacks the heartseg contract."""
