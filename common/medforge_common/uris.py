"""Storage URIs: ``s3://bucket/prefix/`` and ``pvc://claim/path``."""

from __future__ import annotations

import re
from dataclasses import dataclass

# S3 bucket naming rules (the subset every S3-compatible server accepts).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
# A PersistentVolumeClaim name is a DNS-1123 subdomain.
_CLAIM = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class UriError(ValueError):
    """A storage URI that cannot be used; the message names the field and the fix."""


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str  # a prefix when it ends with "/"

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def join(self, *parts: str) -> S3Uri:
        key = self.key if not self.key or self.key.endswith("/") else self.key + "/"
        return S3Uri(self.bucket, key + "/".join(p.strip("/") for p in parts))


@dataclass(frozen=True)
class PvcUri:
    claim: str
    path: str

    def __str__(self) -> str:
        return f"pvc://{self.claim}/{self.path}"


def parse_uri(value: str, field: str = "uri") -> S3Uri | PvcUri:
    """Parse a storage URI, or raise UriError naming `field` and what is accepted."""
    if not isinstance(value, str) or not value:
        raise UriError(
            f"{field}: a storage URI is required (s3://bucket/prefix/ or pvc://claim/path)"
        )
    scheme, sep, rest = value.partition("://")
    if not sep:
        raise UriError(
            f"{field}: {value!r} has no scheme; use s3://bucket/prefix/ or pvc://claim/path"
        )
    bucket, _, key = rest.partition("/")
    if scheme == "s3":
        if not _BUCKET.match(bucket):
            raise UriError(
                f"{field}: {bucket!r} is not a valid S3 bucket name "
                "(3-63 lower-case letters, digits, '.' and '-')"
            )
        if ".." in key.split("/"):
            raise UriError(f"{field}: '..' is not allowed in an S3 key ({value!r})")
        return S3Uri(bucket, key)
    if scheme == "pvc":
        if not _CLAIM.match(bucket):
            raise UriError(f"{field}: {bucket!r} is not a valid PersistentVolumeClaim name")
        if ".." in key.split("/") or key.startswith("/"):
            raise UriError(f"{field}: the path in {value!r} must be relative, without '..'")
        return PvcUri(bucket, key)
    raise UriError(
        f"{field}: unsupported scheme {scheme!r} in {value!r}; "
        "use s3://bucket/prefix/ or pvc://claim/path"
    )
