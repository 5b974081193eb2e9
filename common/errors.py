"""The one base class for errors a user should see as a one-line cause, not a traceback."""

from __future__ import annotations


class LlamafleetError(Exception):
    """An error whose message is meant for the operator: one line, says what to do.

    `exit_code` is what a command-line program exits with when this reaches it.
    """

    exit_code = 1

    def __init__(self, message: str, *, detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        # Supporting text (e.g. the tail of a compiler log), printed below the one-line cause.
        self.detail = detail

    def __str__(self) -> str:
        return self.message


class UsageError(LlamafleetError):
    """Bad input from the operator (a flag, a config value, a source spec)."""

    exit_code = 2
