"""The result a Job writes to its termination-message path (read back by the operator)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DEFAULT_PATH = Path("/dev/termination-log")
MAX_BYTES = 4096  # what a kubelet keeps of a termination message


class ResultTooLarge(ValueError):
    pass


def encode_result(result: dict[str, Any]) -> str:
    text = json.dumps(result, separators=(",", ":"), sort_keys=True)
    if len(text.encode()) > MAX_BYTES:
        raise ResultTooLarge(
            f"the result is {len(text.encode())} bytes; at most {MAX_BYTES} "
            "fit in a termination message"
        )
    return text


def failure_line(reason: str) -> str:
    """One line, cut to fit, for a failed Job."""
    line = " ".join(reason.split())
    return line.encode()[: MAX_BYTES - 1].decode(errors="ignore")


def write_result(result: dict[str, Any], path: Path = DEFAULT_PATH) -> None:
    path.write_text(encode_result(result))


def write_failure(reason: str, path: Path = DEFAULT_PATH) -> None:
    path.write_text(failure_line(reason))


def read_result(message: str) -> dict[str, Any] | None:
    """The operator's side: a JSON object for a success, None for a failure line."""
    try:
        data = json.loads(message)
    except (json.JSONDecodeError, TypeError):
        return None
    return data if isinstance(data, dict) else None
