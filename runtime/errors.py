"""Errors that the command-line tools turn into a message and exit code 2, and the exit code of a scan that failed
unexpectedly."""

from __future__ import annotations

# A scan that failed for a reason that is not a HeartsegError (the other scans of a batch are still processed).
EXIT_FAILED = 1


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


class HeartsegWarning(UserWarning):
    """A warning the command-line tools print as one 'warning: ...' line, without file and line number."""
