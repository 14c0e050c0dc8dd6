"""The local image store: an OCI image layout on disk (what `make images` writes), read by the
process kubelet in container mode.

A pod's `image` is resolved by name and tag (the index entries' `io.containerd.image.name` or
`org.opencontainers.image.ref.name` annotations) or by digest. Each layer is unpacked once,
keyed by its diff_id, into a directory an overlay mount can stack: whiteouts become the
overlay's 0:0 character devices, opaque directories get the overlay's xattr.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import shutil
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

JSON = dict[str, Any]
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


class ImageError(Exception):
    """The image cannot be resolved or unpacked (the kubelet reports ErrImagePull)."""


@dataclass(frozen=True)
class Image:
    reference: str
    digest: str  # of the manifest
    config: JSON  # the image config's `config` (User, Env, Entrypoint, Cmd, WorkingDir)
    layers: tuple[tuple[str, str], ...]  # (blob digest, diff_id), bottom first


def normalise(reference: str) -> tuple[str, str]:
    """(name with tag, digest) of a reference as a kubelet reads it: `busybox` is
    docker.io/library/busybox:latest."""
    name, _, digest = reference.partition("@")
    last = name.rsplit("/", 1)[-1]
    if ":" not in last and name:
        name += ":latest"
    first = name.split("/", 1)[0]
    if "/" not in name or ("." not in first and ":" not in first and first != "localhost"):
        name = f"docker.io/{name if '/' in name else 'library/' + name}"
    return name, digest


class Store:
    def __init__(self, layout: Path, cache: Path) -> None:
        self.layout = layout
        self.blobs = layout / "blobs" / "sha256"
        self.cache = cache

    def _blob(self, digest: str) -> Path:
        algo, _, hexdigest = digest.partition(":")
        if (
            algo != "sha256"
            or len(hexdigest) != 64
            or not all(c in "0123456789abcdef" for c in hexdigest)
        ):
            raise ImageError(f"unsupported digest {digest!r}")
        return self.blobs / hexdigest

    def _json(self, digest: str) -> JSON:
        path = self._blob(digest)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageError(f"blob {digest} is missing from {self.layout}") from exc
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise ImageError(f"blob {digest} in {self.layout} does not match its digest")
        doc: JSON = json.loads(data)
        return doc

    def resolve(self, reference: str) -> Image:
        try:
            index = json.loads((self.layout / "index.json").read_text())
        except (OSError, ValueError) as exc:
            raise ImageError(f"no image store at {self.layout} (run `make images`)") from exc
        name, digest = normalise(reference)
        for entry in index.get("manifests", []):
            notes = entry.get("annotations") or {}
            names = {
                notes.get("io.containerd.image.name"),
                notes.get("org.opencontainers.image.ref.name"),
            }
            if (digest and entry["digest"] == digest) or (not digest and name in names):
                manifest = self._json(entry["digest"])
                config = self._json(manifest["config"]["digest"])
                diff_ids = config["rootfs"]["diff_ids"]
                layers = tuple(
                    zip((la["digest"] for la in manifest["layers"]), diff_ids, strict=True)
                )
                return Image(reference, entry["digest"], config.get("config") or {}, layers)
        raise ImageError(
            f'image "{reference}" is not in the local store {self.layout} (run `make images`)'
        )

    def unpacked(self, image: Image) -> list[Path]:
        """The image's layer directories, top first (overlay's lowerdir order), unpacking
        each one not yet in the cache."""
        return [self._unpack(blob, diff_id) for blob, diff_id in reversed(image.layers)]

    def _unpack(self, blob: str, diff_id: str) -> Path:
        target = self.cache / diff_id.replace(":", "-")
        if target.is_dir():
            return target
        self.cache.mkdir(parents=True, exist_ok=True)
        with _locked(self.cache / f"{target.name}.lock"):
            if target.is_dir():
                return target
            tmp = self.cache / f"{target.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            with self._blob(blob).open("rb") as raw, gzip.open(raw, "rb") as tar_stream:
                hashing = _DiffHash(tar_stream)
                _extract(hashing, tmp)
                got = hashing.digest()
            if got != diff_id:
                shutil.rmtree(tmp)
                raise ImageError(f"layer {blob} does not unpack to its diff_id {diff_id}")
            tmp.rename(target)
        return target


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


class _DiffHash:
    """Reads the tar stream through, hashing it (the layer's diff_id)."""

    def __init__(self, inner: IO[bytes] | gzip.GzipFile) -> None:
        self.inner = inner
        self.sha = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.inner.read(n)
        self.sha.update(data)
        return data

    def digest(self) -> str:
        while self.read(1 << 20):
            pass
        return "sha256:" + self.sha.hexdigest()


def _extract(stream: _DiffHash, dest: Path) -> None:
    with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
        for member in tar:
            path = Path(member.name)
            if member.name.startswith("/") or ".." in path.parts:
                raise ImageError(f"layer entry {member.name!r} escapes the root")
            if path.name == OPAQUE:
                (dest / path.parent).mkdir(parents=True, exist_ok=True)
                os.setxattr(dest / path.parent, "trusted.overlay.opaque", b"y")
            elif path.name.startswith(WHITEOUT):
                gone = dest / path.parent / path.name.removeprefix(WHITEOUT)
                (dest / path.parent).mkdir(parents=True, exist_ok=True)
                os.mknod(gone, 0o600 | 0o020000, os.makedev(0, 0))
            else:
                _inside(dest, dest / path.parent, member.name)
                if member.islnk():
                    _inside(dest, dest / member.linkname, member.name)
                # Modes and owners as the image has them (/tmp's sticky bit included).
                tar.extract(member, dest, filter="fully_trusted")


def _inside(root: Path, path: Path, name: str) -> None:
    """Refuse an entry that would be written (or hard-linked) outside root through a link."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    if real != base and not real.startswith(base + os.sep):
        raise ImageError(f"layer entry {name!r} would be written outside the image's root")
