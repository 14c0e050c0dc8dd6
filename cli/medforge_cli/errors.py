"""The one failure the commands raise: its message is the single line the user sees."""

from __future__ import annotations


class CliError(Exception):
    """A user-facing failure; `code` is the exit status (1: failed, 2: bad usage or input)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code
