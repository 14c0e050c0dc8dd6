"""Presigned queries out of every message: a URL quoted in an error must not become readable to
anyone who may view status, Events, logs or termination messages. Shared by the operator and the
job programs (standard library only)."""

from __future__ import annotations

import logging
import re
from typing import Any

# A query that carries a signature, credential, token or expiry parameter, wherever it stands:
# after a full URL, after a bare path (urllib3 prints `url: /bucket/key?X-Amz-...`), URL-encoded
# or cut at a line end. It goes whole; the path before it stays for the reader.
_SIGNED_QUERY = re.compile(
    r"\?[^\s\"'<>]*?(?:X-Amz-|AWSAccessKeyId|Signature|x-amz-security-token|Expires)"
    r"[^\s\"'<>]*",
    re.IGNORECASE,
)
# Loose parameters (a query printed without its `?`, or split by a logger).
_LOOSE_PARAM = re.compile(
    r"(?:X-Amz-[A-Za-z-]+|AWSAccessKeyId|Signature|x-amz-security-token)(?:=|%3D)[^\s\"'&<>]*",
    re.IGNORECASE,
)
REDACTED = "<redacted>"


def redact(text: str) -> str:
    """The text with every presigned query removed."""
    if "?" in text:
        text = _SIGNED_QUERY.sub("?" + REDACTED, text)
    return _LOOSE_PARAM.sub(REDACTED, text)


def redact_all(value: Any) -> Any:
    """Every string in a JSON value, redacted (keys too)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list):
        return [redact_all(v) for v in value]
    if isinstance(value, dict):
        return {redact(str(k)): redact_all(v) for k, v in value.items()}
    return value


class RedactingFilter(logging.Filter):
    """A logging filter that redacts each record's formatted message (and its exception) before
    any handler writes it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return True
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        record.msg, record.args = redact(message), None
        return True


def install_log_redaction() -> None:
    """Redact every record that reaches the root logger's handlers."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
