"""The forge store as the operator uses it: presigned URLs for Jobs, and verification of what
Jobs uploaded. Jobs never receive the store's credentials."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from medforge_common.artifacts import MANIFEST_FILE
from medforge_common.manifest import MAX_MANIFEST_BYTES, Manifest, ManifestError, digest_of
from medforge_common.uris import S3Uri, UriError, parse_uri
from medforge_operator.settings import Settings

MAX_SINGLE_COPY = 5 << 30  # S3's limit for one CopyObject request


class StoreUnreachable(Exception):
    """The store could not be reached or refused the operator's credentials."""


class VerificationFailed(Exception):
    """What was uploaded does not match what the Job reported."""


class InvalidManifest(VerificationFailed):
    """The manifest itself is malformed (wrong types, duplicate or unsafe names, sizes)."""


class InvalidResult(VerificationFailed):
    """A result file a Job wrote beside its artifact is not a result (the message says why)."""


class ObjectMissing(VerificationFailed):
    """An object that should be in the store is not (`uri` names it)."""

    def __init__(self, uri: S3Uri, message: str) -> None:
        super().__init__(message)
        self.uri = uri


def _client(endpoint: str, s: Settings) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        # None: boto3's default chain (the pod's identity) when no static keys are set.
        aws_access_key_id=s.store_access_key or None,
        aws_secret_access_key=s.store_secret_key or None,
        region_name=s.store_region,
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            connect_timeout=5,
            read_timeout=30,
            retries={"max_attempts": 2, "mode": "standard"},
            max_pool_connections=32,
        ),
    )


def s3_uri(value: str, field: str) -> S3Uri:
    uri = parse_uri(value, field)
    if not isinstance(uri, S3Uri):
        raise UriError(f"{field}: must be an s3:// URI in the forge store")
    return uri


class ForgeStore:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.bucket = settings.store_bucket
        self._api = _client(settings.store_endpoint, settings)
        # Presigning is local computation; URLs name the endpoint the Jobs reach.
        self._signer = _client(settings.presign_endpoint, settings)

    def uri(self, key: str) -> S3Uri:
        return S3Uri(self.bucket, key)

    def _presign(self, operation: str, uri: S3Uri, expires: int | None) -> str:
        return str(
            self._signer.generate_presigned_url(
                operation,
                Params={"Bucket": uri.bucket, "Key": uri.key},
                ExpiresIn=expires or self.s.presign_expiry_seconds,
            )
        )

    def presign_get(self, uri: S3Uri, expires: int | None = None) -> str:
        return self._presign("get_object", uri, expires)

    def presign_put(self, uri: S3Uri, expires: int | None = None) -> str:
        return self._presign("put_object", uri, expires)

    @contextlib.contextmanager
    def _reading(self, uri: S3Uri, missing: str) -> Iterator[None]:
        """A missing object is a verdict (VerificationFailed, `missing` says how); anything
        else the store answers, or its silence, is a fault (StoreUnreachable, retried)."""
        try:
            yield
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise ObjectMissing(uri, f"{uri} {missing}") from exc
            raise StoreUnreachable(f"the forge store refused reading {uri}: {code}") from exc
        except BotoCoreError as exc:
            raise StoreUnreachable(
                f"the forge store at {self.s.store_endpoint} is unreachable: {exc}"
            ) from exc

    def size(self, uri: S3Uri) -> int:
        """An object's size from a HEAD request, before anything is downloaded."""
        with self._reading(uri, "was not uploaded"):
            head = self._api.head_object(Bucket=uri.bucket, Key=uri.key)
        return int(head.get("ContentLength", 0))

    def read(self, uri: S3Uri, limit: int = MAX_MANIFEST_BYTES) -> bytes:
        with self._reading(uri, "does not exist"):
            obj = self._api.get_object(Bucket=uri.bucket, Key=uri.key)
            body: bytes = obj["Body"].read(limit + 1)
        if len(body) > limit:
            raise VerificationFailed(f"{uri} is larger than {limit} bytes")
        return body

    def sha256(self, uri: S3Uri, limit: int | None = None) -> tuple[str, int]:
        """Stream an object and hash it (constant memory); past `limit` bytes it stops: the
        object is not what the manifest says."""
        h = hashlib.sha256()
        size = 0
        with self._reading(uri, "was not uploaded"):
            obj = self._api.get_object(Bucket=uri.bucket, Key=uri.key)
            for chunk in obj["Body"].iter_chunks(1 << 20):
                h.update(chunk)
                size += len(chunk)
                if limit is not None and size > limit:
                    raise VerificationFailed(f"{uri} holds more than the {limit} bytes expected")
        return h.hexdigest(), size

    def copy(self, src: S3Uri, dst: S3Uri, limit: int, exact: int | None = None) -> None:
        """A server-side copy, after a HEAD shows the source is no larger than `limit` (and,
        given, exactly `exact` bytes). The copy is made only of the version that HEAD saw: an
        object replaced in between fails the copy's precondition."""
        with self._reading(src, "was not uploaded"):
            head = self._api.head_object(Bucket=src.bucket, Key=src.key)
        size = int(head.get("ContentLength", 0))
        if size > limit or (exact is not None and size != exact):
            want = f"the manifest lists {exact}" if exact is not None else f"at most {limit}"
            raise VerificationFailed(f"{src.key.rsplit('/', 1)[-1]}: {size} bytes stored, {want}")
        source: dict[str, str] = {"Bucket": src.bucket, "Key": src.key}
        extra: dict[str, Any] = {}
        if head.get("ETag"):
            extra["CopySourceIfMatch"] = head["ETag"]
        try:
            with self._reading(src, "was not uploaded"):
                if size <= MAX_SINGLE_COPY:
                    self._api.copy_object(
                        Bucket=dst.bucket, Key=dst.key, CopySource=source, **extra
                    )
                else:  # past S3's single-request copy limit: a multipart copy
                    self._api.copy(source, dst.bucket, dst.key)
        except StoreUnreachable as exc:
            if "PreconditionFailed" in str(exc) or "412" in str(exc):
                raise VerificationFailed(
                    f"{src.key.rsplit('/', 1)[-1]} changed while it was being verified"
                ) from exc
            raise

    def delete(self, uris: list[S3Uri]) -> None:
        """Best effort: what a failed verification copied is removed (a retry copies again)."""
        for uri in uris:
            with contextlib.suppress(ClientError, BotoCoreError):
                self._api.delete_object(Bucket=uri.bucket, Key=uri.key)

    def _versions(self, prefix: S3Uri) -> list[tuple[str, str | None]]:
        """(key, version id) of every object version and delete marker under `prefix`; a
        store or bucket that keeps no versions answers with its current objects."""
        out: list[tuple[str, str | None]] = []
        try:
            pages = self._api.get_paginator("list_object_versions").paginate(
                Bucket=prefix.bucket, Prefix=prefix.key
            )
            for page in pages:
                for v in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]:
                    vid = v.get("VersionId")
                    out.append((str(v["Key"]), None if vid in (None, "", "null") else str(vid)))
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code not in ("NotImplemented", "MethodNotAllowed", "501"):
                raise
        pages = self._api.get_paginator("list_objects_v2").paginate(
            Bucket=prefix.bucket, Prefix=prefix.key
        )
        for page in pages:
            out += [(str(o["Key"]), None) for o in page.get("Contents", [])]
        return list(dict.fromkeys(out))

    def erase(self, prefix: S3Uri) -> list[str]:
        """Delete every object under `prefix` (a folder: it ends with /), every version and
        delete marker too where the bucket keeps versions; the keys deleted, sorted. A fault is
        StoreUnreachable and the next call goes on where this one stopped."""
        if not prefix.key.endswith("/") or prefix.key.count("/") < 2:
            raise ValueError(f"refusing to erase {prefix}: not an artifact's folder")
        deleted: set[str] = set()
        try:
            for _ in range(3):  # a delete marker written meanwhile is found on the next pass
                found = self._versions(prefix)
                if not found:
                    break
                for key, version in found:
                    extra = {"VersionId": version} if version else {}
                    self._api.delete_object(Bucket=prefix.bucket, Key=key, **extra)
                    deleted.add(key)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            raise StoreUnreachable(f"the forge store refused erasing {prefix}: {code}") from exc
        except BotoCoreError as exc:
            raise StoreUnreachable(
                f"the forge store at {self.s.store_endpoint} is unreachable: {exc}"
            ) from exc
        return sorted(deleted)

    def write_json(self, uri: S3Uri, data: dict[str, Any]) -> None:
        """A small JSON object the operator writes itself (an erasure receipt)."""
        body = json.dumps(data, sort_keys=True, indent=1).encode()
        try:
            self._api.put_object(
                Bucket=uri.bucket, Key=uri.key, Body=body, ContentType="application/json"
            )
        except (ClientError, BotoCoreError) as exc:
            raise StoreUnreachable(f"the forge store refused writing {uri}: {exc}") from exc

    def _manifest(self, prefix: S3Uri, digest: str | None) -> Manifest:
        raw = self.read(prefix.join(MANIFEST_FILE))
        actual = digest_of(raw)
        if digest is not None and actual != digest:
            raise VerificationFailed(
                f"manifest.json has digest {actual[:19]}..., expected {digest[:19]}..."
            )
        try:
            manifest = Manifest.from_json(raw.decode(), str(prefix.join(MANIFEST_FILE)))
        except (ManifestError, UnicodeDecodeError) as exc:
            raise InvalidManifest(str(exc)) from exc
        cap = self.s.max_artifact_bytes
        for entry in manifest.files:
            if entry.size > cap:
                raise VerificationFailed(
                    f"{entry.name}: the manifest lists {entry.size} bytes, more than the "
                    f"operator's limit of {cap} (MEDFORGE_MAX_ARTIFACT_BYTES)"
                )
        return manifest

    def _hash_files(self, prefix: S3Uri, manifest: Manifest) -> None:
        for entry in manifest.files:
            sha, size = self.sha256(prefix.join(entry.name), entry.size)
            if sha != entry.sha256 or size != entry.size:
                raise VerificationFailed(
                    f"{entry.name}: sha256 {sha[:12]}... ({size} bytes) does not match the "
                    f"manifest's {entry.sha256[:12]}... ({entry.size} bytes)"
                )

    def verify_artifact(self, prefix: S3Uri, digest: str | None) -> Manifest:
        """Check manifest.json against the expected digest (None: take it as it is), then every
        file it lists: its size first (HEAD: an upload larger than the manifest says, or than
        the operator's cap, is refused before a byte is downloaded), then its sha256. For what
        only the operator writes (a BaseModel's files); uploads go through verify_copy."""
        manifest = self._manifest(prefix, digest)
        for entry in manifest.files:
            stored = self.size(prefix.join(entry.name))
            if stored != entry.size:
                raise VerificationFailed(
                    f"{entry.name}: {stored} bytes stored, the manifest lists {entry.size}"
                )
        self._hash_files(prefix, manifest)
        return manifest

    def verify_copy(self, upload: S3Uri, verified: S3Uri, digest: str) -> Manifest:
        """Copy an upload server-side into `verified` (a prefix no presigned PUT ever targets),
        then check the copy, never the upload: a presigned PUT cannot be revoked, so the upload
        may change while it is hashed, and whatever changes there later is read by no one. On
        a verdict the copy is removed."""
        copied = [verified.join(MANIFEST_FILE)]
        try:
            self.copy(upload.join(MANIFEST_FILE), copied[0], MAX_MANIFEST_BYTES)
            manifest = self._manifest(verified, digest)
            for entry in manifest.files:
                copied.append(verified.join(entry.name))
                self.copy(upload.join(entry.name), copied[-1], entry.size, entry.size)
            self._hash_files(verified, manifest)
        except VerificationFailed:
            self.delete(copied)
            raise
        return manifest

    def read_json(
        self, prefix: S3Uri, ref: Any, limit: int, artifact: bool = True
    ) -> dict[str, Any]:
        """A JSON object a Job wrote beside its artifact, checked against the digest its
        termination message announced (`ref`: name, digest). Without a digest (the pods that
        announced it are gone) it is taken as found: the artifact digest it names is still
        checked against the manifest, file by file."""
        name = ref.get("name") if isinstance(ref, dict) else None
        if not isinstance(name, str) or "/" in name or name.startswith("."):
            raise InvalidResult(f"InvalidResult: the result file's name {name!r:.60} is not plain")
        raw = self.read(prefix.join(name), limit)
        expected = ref.get("digest")
        if expected is not None and digest_of(raw) != expected:
            raise InvalidResult(f"InvalidResult: {name} does not match its announced digest")
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise InvalidResult(f"InvalidResult: {name} is not JSON ({exc})") from exc
        if not isinstance(data, dict) or (artifact and not isinstance(data.get("artifact"), dict)):
            raise InvalidResult(f"InvalidResult: {name} holds no result object")
        if not isinstance(data.get("inputs", []), list):
            raise InvalidResult(f"InvalidResult: {name}: inputs must be a list")
        return data

    def manifest_digest(self, prefix: S3Uri) -> str:
        raw = self.read(prefix.join(MANIFEST_FILE))
        return digest_of(raw)
