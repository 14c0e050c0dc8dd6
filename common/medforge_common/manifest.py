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


def digest_of(data: bytes) -> str:
    """The `sha256:<hex>` digest every manifest, result file and artifact is named by."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> tuple[str, int]:
    """Streamed sha256 and size of a file (constant memory)."""
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _refuse_pickle(name: str, instead: str) -> None:
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise ManifestError(
            f"{name}: pickle-based files are refused because loading them can run code; {instead}"
        )


def check_safe_name(name: str) -> None:
    """Refuse pickle formats and path tricks, with the reason."""
    _refuse_pickle(name, "export the weights as .safetensors")
    lower = name.lower()
    if not lower.endswith(ALLOWED_SUFFIXES):
        raise ManifestError(f"{name}: only .safetensors and .json files are accepted")
    if "/" in name or "\\" in name or name.startswith("."):
        raise ManifestError(f"{name}: file names must be plain names, without directories")


# A base model is a save_pretrained folder: weights (possibly sharded, possibly in nested
# folders such as text_encoder/), configs and tokenizer files. Code files are refused: nothing
# MedForge loads ever runs a model's own Python (trust_remote_code stays off).
MODEL_REFUSED_SUFFIXES = (".py", ".pyc", ".so", ".sh", ".exe", ".dll")
BASE_MODEL_KIND = "base-model"


def check_model_file_name(name: str) -> None:
    """A file of a base model: a relative path of plain segments, never a pickle or code."""
    _refuse_pickle(name, "save the model with safe_serialization=True (model.safetensors)")
    lower = name.lower()
    if lower.endswith(MODEL_REFUSED_SUFFIXES):
        raise ManifestError(f"{name}: code files are refused; a base model is weights and configs")
    parts = name.split("/")
    if (
        not name
        or "\\" in name
        or len(name) > 512
        or any(p in ("", ".", "..") or p.startswith(".") for p in parts)
    ):
        raise ManifestError(
            f"{name!r}: a base model's files must be relative paths of plain names "
            "(no '..', no absolute paths, no hidden files)"
        )


def looks_like_pickle(path: Path) -> bool:
    """True for a pickle stream or a torch.save archive (a zip holding data.pkl), whatever the
    file is called."""
    import zipfile

    with path.open("rb") as f:
        head = f.read(4)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # PROTO opcode
        return True
    if head == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                return any(n.endswith((".pkl", "data.pkl")) for n in z.namelist())
        except zipfile.BadZipFile:
            return False
    return False


MAX_FILES = 64  # an artifact is a handful of files; anything more is not ours
MAX_MODEL_FILES = 4096  # a sharded model with its tokenizer and sub-models
MAX_FILE_BYTES = 1 << 40
MAX_MANIFEST_BYTES = 1 << 20  # a manifest lists at most MAX_FILES entries and a small meta


def _files(raw: Any, source: str, kind: Any = "") -> list[FileEntry]:
    """The file list, each entry checked: a safe name (a plain artifact name, or a base
    model's relative path), once; a hex sha256; a size."""
    model = kind == BASE_MODEL_KIND
    limit = MAX_MODEL_FILES if model else MAX_FILES
    check = check_model_file_name if model else check_safe_name
    if not isinstance(raw, list) or len(raw) > limit:
        raise ManifestError(f"{source}: files must be a list of at most {limit} entries")
    files: list[FileEntry] = []
    for f in raw:
        if not isinstance(f, dict):
            raise ManifestError(f"{source}: every file needs name, sha256 and size")
        name, sha, size = f.get("name"), f.get("sha256"), f.get("size")
        if not (isinstance(name, str) and isinstance(sha, str) and type(size) is int):
            raise ManifestError(f"{source}: every file needs name, sha256 and size ({f!r:.80})")
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ManifestError(f"{source}: {name}: sha256 must be 64 lower-case hex digits")
        if not 0 <= size <= MAX_FILE_BYTES:
            raise ManifestError(f"{source}: {name}: size {size} is out of range")
        check(name)
        if any(e.name == name for e in files):
            raise ManifestError(f"{source}: {name} is listed twice")
        files.append(FileEntry(name, sha, size))
    return files


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
        except (json.JSONDecodeError, RecursionError) as exc:  # nesting past the parser's depth
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
        files = _files(data["files"], source, data["kind"])
        meta = data.get("meta")
        if meta is not None and not isinstance(meta, dict):
            raise ManifestError(f"{source}: meta must be a JSON object, not {type(meta).__name__}")
        if not isinstance(data["kind"], str) or not isinstance(data["base_model_digest"], str):
            raise ManifestError(f"{source}: kind and base_model_digest must be strings")
        return cls(data["kind"], data["base_model_digest"], files, dict(meta or {}), version)

    def add_file(self, path: Path) -> FileEntry:
        check_safe_name(path.name)
        digest, size = sha256_file(path)
        entry = FileEntry(path.name, digest, size)
        self.files = [f for f in self.files if f.name != path.name] + [entry]
        return entry

    def digest(self) -> str:
        """The artifact's identity: sha256 of the canonical manifest JSON."""
        return digest_of(self.to_json().encode())


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
