"""Domain errors: library code raises these; the CLI prints them as one line plus a hint."""

from __future__ import annotations


class AgdError(Exception):
    """A user-facing error: a message naming the bad value, and a hint on what to do."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class InputError(AgdError):
    """Bad flag, preset value or input file."""


class DataError(AgdError):
    """Missing, corrupt or mismatched run data (trajectories, checkpoints, adapters)."""


class ModelError(AgdError):
    """A model cannot be loaded or does not fit what is asked of it."""
