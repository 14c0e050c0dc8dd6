"""Moving files through presigned URLs, with retries: a store that blips (a timeout, a 5xx, a
connection reset) at the end of hours of training must not fail the contribution. urllib3's
Retry does the backoff (0.5 s, 1 s, 2 s, ...); a 4xx (an expired or wrong URL) is final."""

from __future__ import annotations

import shutil
from pathlib import Path

import urllib3
from urllib3.util.retry import Retry

from medforge_common.redact import redact
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


class StoreError(ModelError):
    """The store could not be reached or refused the request (an outage, an expired URL): a
    fault of the store, retried by whoever asked, never a verdict on what was asked for."""


class TooLarge(ModelError):
    """The object is larger than the reader allows: a verdict on whoever wrote it, not a fault
    of the store."""


def _copy_capped(resp: urllib3.BaseHTTPResponse, target: Path, what: str, cap: int) -> None:
    declared = resp.headers.get("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise TooLarge(f"{what}: {int(declared)} bytes, more than the {cap} expected")
    seen = 0
    with target.open("wb") as out:
        while chunk := resp.read(CHUNK):
            seen += len(chunk)
            if seen > cap:
                raise TooLarge(f"{what}: more than the {cap} bytes expected; not read further")
            out.write(chunk)


def download(
    url: str, target: Path, what: str, retries: Retry = RETRIES, max_bytes: int | None = None
) -> None:
    """GET a presigned URL into a file, streamed; with `max_bytes`, never more than that is
    read (TooLarge, the part read removed)."""
    try:
        resp = _pool(retries).request("GET", url, preload_content=False)
        try:
            if resp.status != 200:
                raise StoreError(f"{what}: the store answered HTTP {resp.status} (expired URL?)")
            if max_bytes is not None:
                _copy_capped(resp, target, what, max_bytes)
            else:
                with target.open("wb") as out:
                    shutil.copyfileobj(resp, out, CHUNK)
        except TooLarge:
            target.unlink(missing_ok=True)
            raise
        finally:
            resp.release_conn()
    except urllib3.exceptions.HTTPError as exc:
        raise StoreError(f"{what}: cannot be read ({redact(str(exc))})") from exc
    except OSError as exc:
        raise ModelError(f"{what}: cannot be written ({redact(str(exc))})") from exc


def upload(url: str, source: Path, what: str, retries: Retry = RETRIES) -> None:
    """PUT a file to a presigned URL (the body is re-sent on every retry)."""
    try:
        resp = _pool(retries).request("PUT", url, body=source.read_bytes())
    except urllib3.exceptions.HTTPError as exc:
        raise StoreError(f"upload of {what} failed ({redact(str(exc))})") from exc
    if resp.status not in (200, 201):
        raise StoreError(f"upload of {what} answered HTTP {resp.status} (expired URL?)")
