"""The artifact manifest: what a contribution or a composite holds, and the digest of each file.

Every consumer verifies files against the manifest before using them, and refuses pickle-based
formats outright: safetensors (and JSON) only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
CHUNK = 1 << 20
# Formats that execute code when loaded: never accepted as inputs.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
ALLOWED_SUFFIXES = (".safetensors", ".json")


class ManifestError(ValueError):
    """A manifest or a file that does not match it; the message names the file."""


@dataclass(frozen=True)
class FileEntry:
    name: str
    sha256: str
    size: int


def sha256_file(path: Path) -> tuple[str, int]:
    """Streamed sha256 and size of a file (constant memory)."""
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def check_safe_name(name: str) -> None:
    """Refuse pickle formats and path tricks, with the reason."""
    lower = name.lower()
    if lower.endswith(PICKLE_SUFFIXES):
        raise ManifestError(
            f"{name}: pickle-based files are refused because loading them can run code; "
            "export the weights as .safetensors"
        )
    if not lower.endswith(ALLOWED_SUFFIXES):
        raise ManifestError(f"{name}: only .safetensors and .json files are accepted")
    if "/" in name or "\\" in name or name.startswith("."):
        raise ManifestError(f"{name}: file names must be plain names, without directories")


@dataclass
class Manifest:
    kind: str  # "contribution" or "composite"
    base_model_digest: str
    files: list[FileEntry] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)  # task, classes, rank, metrics, ...
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "manifest.json") -> Manifest:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{source}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise ManifestError(f"{source}: expected a JSON object")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestError(
                f"{source}: schema_version {version!r} is not supported "
                f"(this tool reads {SCHEMA_VERSION})"
            )
        for key in ("kind", "base_model_digest", "files"):
            if key not in data:
                raise ManifestError(f"{source}: the field {key!r} is missing")
        try:
            files = [
                FileEntry(str(f["name"]), str(f["sha256"]), int(f["size"])) for f in data["files"]
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(
                f"{source}: every file needs name, sha256 and size ({exc})"
            ) from exc
        for f in files:
            check_safe_name(f.name)
        return cls(
            str(data["kind"]),
            str(data["base_model_digest"]),
            files,
            dict(data.get("meta") or {}),
            version,
        )

    def add_file(self, path: Path) -> FileEntry:
        check_safe_name(path.name)
        digest, size = sha256_file(path)
        entry = FileEntry(path.name, digest, size)
        self.files = [f for f in self.files if f.name != path.name] + [entry]
        return entry

    def digest(self) -> str:
        """The artifact's identity: sha256 of the canonical manifest JSON."""
        return "sha256:" + hashlib.sha256(self.to_json().encode()).hexdigest()


def verify_file(path: Path, entry: FileEntry) -> None:
    """Raise ManifestError unless the file has the manifest's size and sha256."""
    if not path.is_file():
        raise ManifestError(f"{entry.name}: listed in the manifest but missing")
    digest, size = sha256_file(path)
    if size != entry.size:
        raise ManifestError(f"{entry.name}: size {size} differs from the manifest's {entry.size}")
    if digest != entry.sha256:
        raise ManifestError(
            f"{entry.name}: sha256 {digest[:12]}... differs from the "
            f"manifest's {entry.sha256[:12]}...; the file is corrupt or was "
            "replaced"
        )


def verify_dir(directory: Path, manifest: Manifest) -> None:
    for entry in manifest.files:
        verify_file(directory / entry.name, entry)
