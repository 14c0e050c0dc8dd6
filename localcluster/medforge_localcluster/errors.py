"""Errors the local cluster reports to a person, with what to do about them."""

from __future__ import annotations


class SetupError(Exception):
    """Something the user must fix (a missing tool, no disk space, a port in use)."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  fix: {self.hint}" if self.hint else self.message
