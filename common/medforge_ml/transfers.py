"""Moving files through presigned URLs, with retries: a store that blips (a timeout, a 5xx, a
connection reset) at the end of hours of training must not fail the contribution. urllib3's
Retry does the backoff (0.5 s, 1 s, 2 s, ...); a 4xx (an expired or wrong URL) is final."""

from __future__ import annotations

import shutil
from pathlib import Path

import urllib3
from urllib3.util.retry import Retry

from medforge_ml.errors import ModelError

CHUNK = 1 << 20
RETRIES = Retry(
    total=6,
    connect=6,
    read=6,
    status=6,
    backoff_factor=0.5,
    backoff_max=30,
    status_forcelist=(429, 500, 502, 503, 504),
    allowed_methods=frozenset({"GET", "PUT"}),  # presigned GETs and PUTs are idempotent
    raise_on_status=False,
)


def _pool(retries: Retry = RETRIES) -> urllib3.PoolManager:
    return urllib3.PoolManager(retries=retries, timeout=urllib3.Timeout(connect=10, read=300))


def download(url: str, target: Path, what: str, retries: Retry = RETRIES) -> None:
    """GET a presigned URL into a file, streamed."""
    try:
        resp = _pool(retries).request("GET", url, preload_content=False)
        try:
            if resp.status != 200:
                raise ModelError(f"{what}: the store answered HTTP {resp.status} (expired URL?)")
            with target.open("wb") as out:
                shutil.copyfileobj(resp, out, CHUNK)
        finally:
            resp.release_conn()
    except urllib3.exceptions.HTTPError as exc:
        raise ModelError(f"{what}: cannot be read ({exc})") from exc
    except OSError as exc:
        raise ModelError(f"{what}: cannot be written ({exc})") from exc


def upload(url: str, source: Path, what: str, retries: Retry = RETRIES) -> None:
    """PUT a file to a presigned URL (the body is re-sent on every retry)."""
    try:
        resp = _pool(retries).request("PUT", url, body=source.read_bytes())
    except urllib3.exceptions.HTTPError as exc:
        raise ModelError(f"upload of {what} failed ({exc})") from exc
    if resp.status not in (200, 201):
        raise ModelError(f"upload of {what} answered HTTP {resp.status} (expired URL?)")
