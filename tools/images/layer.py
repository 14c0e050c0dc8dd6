"""Deterministic OCI layers and the OCI image layout they are written to.

Layers are gzip'd tar streams written by the standard library: entries in sorted order, every
time set to SOURCE_DATE_EPOCH, owners by number only, no setuid or setgid bits, gzip without
a name or a time. The same tree gives the same bytes, hence the same digests, on any machine.
"""

from __future__ import annotations

import filecmp
import gzip
import hashlib
import json
import os
import stat
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

JSON = dict[str, Any]
LAYER_MEDIA = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG_MEDIA = "application/vnd.oci.image.config.v1+json"
MANIFEST_MEDIA = "application/vnd.oci.image.manifest.v1+json"
INDEX_MEDIA = "application/vnd.oci.image.index.v1+json"
CHUNK = 1 << 20


@dataclass(frozen=True)
class Layer:
    digest: str  # of the gzip'd bytes (the blob)
    diff_id: str  # of the tar stream (the image config's rootfs.diff_ids)
    size: int

    def descriptor(self) -> JSON:
        return {"mediaType": LAYER_MEDIA, "digest": self.digest, "size": self.size}


class _Hashing:
    """A write-only file that hashes what passes through it on its way to `inner`."""

    def __init__(self, inner: IO[bytes] | gzip.GzipFile) -> None:
        self.inner = inner
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.inner.write(data)

    def flush(self) -> None:
        self.inner.flush()


def walk(root: Path, under: str = "") -> Iterator[str]:
    """Every path below root/under (relative to root, directories included), sorted."""
    start = root / under if under else root
    if under:
        yield under
    for dirpath, dirnames, filenames in os.walk(start):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        for name in sorted([*dirnames, *filenames]):
            yield name if rel == "." else f"{rel}/{name}"


def _same(lower: Path, upper: Path) -> bool:
    a, b = os.lstat(lower), os.lstat(upper)
    if (a.st_mode, a.st_uid, a.st_gid) != (b.st_mode, b.st_uid, b.st_gid):
        return False
    if stat.S_ISLNK(a.st_mode):
        return lower.readlink() == upper.readlink()
    if stat.S_ISREG(a.st_mode):
        return a.st_size == b.st_size and filecmp.cmp(lower, upper, shallow=False)
    return True


def diff(lower: Path, upper: Path) -> tuple[list[str], list[str]]:
    """(paths added or changed in upper, paths of lower that upper lacks)."""
    old = set(walk(lower))
    changed = [p for p in walk(upper) if p not in old or not _same(lower / p, upper / p)]
    gone = old - set(walk(upper))
    return changed, [p for p in sorted(gone) if str(Path(p).parent) not in gone]


def _with_parents(paths: Iterable[str]) -> list[str]:
    out: set[str] = set()
    for p in paths:
        out.add(p)
        parent = Path(p).parent
        while str(parent) != ".":
            out.add(str(parent))
            parent = parent.parent
    return sorted(out)


def _entry(root: Path, rel: str, epoch: int, links: dict[tuple[int, int], str]) -> tarfile.TarInfo:
    st = os.lstat(root / rel)
    info = tarfile.TarInfo(rel)
    info.mode = stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.uname = info.gname = ""
    info.mtime = epoch
    if stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(st.st_mode):
        info.type, info.linkname = tarfile.SYMTYPE, str((root / rel).readlink())
    elif stat.S_ISREG(st.st_mode):
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in links:
            info.type, info.linkname = tarfile.LNKTYPE, links[key]
        else:
            links[key] = rel
            info.size = st.st_size
    else:
        raise ValueError(f"{rel}: only files, directories and links belong in an image layer")
    return info


def write_layer(
    root: Path, paths: Iterable[str], blobs: Path, epoch: int, deleted: Iterable[str] = ()
) -> Layer:
    """Pack root's `paths` (their parents added) and whiteouts for `deleted` into a blob."""
    blobs.mkdir(parents=True, exist_ok=True)
    tmp = blobs / f".layer-{os.getpid()}.tmp"
    links: dict[tuple[int, int], str] = {}
    whiteouts = {str(Path(p).parent / f".wh.{Path(p).name}").removeprefix("./"): p for p in deleted}
    with tmp.open("wb") as raw:
        outer = _Hashing(raw)
        with gzip.GzipFile(filename="", mode="wb", fileobj=outer, mtime=0, compresslevel=6) as gz:
            inner = _Hashing(gz)
            with tarfile.open(fileobj=inner, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
                for rel in _with_parents([*paths, *whiteouts]):
                    if rel in whiteouts:
                        info = tarfile.TarInfo(rel)
                        info.mtime = epoch
                        tar.addfile(info)
                        continue
                    info = _entry(root, rel, epoch, links)
                    if info.isreg():
                        with (root / rel).open("rb") as f:
                            tar.addfile(info, f)
                    else:
                        tar.addfile(info)
    digest = "sha256:" + outer.sha.hexdigest()
    tmp.rename(blobs / digest.removeprefix("sha256:"))
    return Layer(digest, "sha256:" + inner.sha.hexdigest(), outer.size)


def canonical(doc: JSON) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def write_blob(blobs: Path, data: bytes, media: str) -> JSON:
    digest = hashlib.sha256(data).hexdigest()
    blobs.mkdir(parents=True, exist_ok=True)
    (blobs / digest).write_bytes(data)
    return {"mediaType": media, "digest": f"sha256:{digest}", "size": len(data)}


def write_index(layout: Path, manifests: list[JSON]) -> None:
    """The layout's index.json and oci-layout marker (manifests carry their ref names)."""
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    index = {"schemaVersion": 2, "mediaType": INDEX_MEDIA, "manifests": manifests}
    (layout / "index.json").write_bytes(canonical(index))
