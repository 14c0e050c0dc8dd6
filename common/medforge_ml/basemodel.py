"""A base model from the forge store or a local folder, checked file by file against its
manifest (whose sha256 the job config names) before anything loads it; and the manifest for a
save_pretrained folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from medforge_common.manifest import (
    FileEntry,
    Manifest,
    ManifestError,
    check_model_file_name,
    digest_of,
    sha256_file,
    verify_file,
)
from medforge_ml.errors import ModelError
from medforge_ml.transfers import download


def check_base_file_name(name: str) -> None:
    """Base models carry tokenizer files (merges.txt, vocab.json) besides safetensors, possibly
    in nested folders; anything pickle-based, code, or a path leaving the folder is refused
    before a byte is read."""
    try:
        check_model_file_name(name)
    except ManifestError as exc:
        raise ModelError(f"base model file {exc}") from exc


def fetch_model_dir(digest: str, files: list[dict[str, Any]], path: str | None, dest: Path) -> Path:
    """A verified base-model directory from presigned URLs / paths (`files`) or a local `path`
    (shared with the merger, which evaluates composites on the same base model)."""
    if path is not None and not files:
        src = Path(path)
        if not (src / "manifest.json").is_file():
            raise ModelError(
                f"baseModel.path: {src} holds no manifest.json; create one with "
                "`medforge-train --prepare-base-model DIR`"
            )
        manifest = _check_manifest((src / "manifest.json").read_bytes(), digest)
        for entry in manifest.files:
            check_base_file_name(entry.name)
            _verify(src / entry.name, entry)
        return src
    dest.mkdir(parents=True, exist_ok=True)
    by_name = {f["name"]: f for f in files}
    if "manifest.json" not in by_name:
        raise ModelError("baseModel.files: the base model's manifest.json is not among them")
    _get(by_name["manifest.json"], dest / "manifest.json")
    manifest = _check_manifest((dest / "manifest.json").read_bytes(), digest)
    for entry in manifest.files:
        check_base_file_name(entry.name)
        if entry.name not in by_name:
            raise ModelError(f"base model file {entry.name}: listed in its manifest but not given")
        (dest / entry.name).parent.mkdir(parents=True, exist_ok=True)
        _get(by_name[entry.name], dest / entry.name)
        _verify(dest / entry.name, entry)
    return dest


def get_file(spec: dict[str, Any], target: Path, what: str) -> None:
    """One file of a job config's list: {name, url} (a presigned URL) or {name, path} (by
    hand); `what` names it in the error."""
    if "path" in spec:
        try:
            shutil.copyfile(str(spec["path"]), target)
        except OSError as exc:
            raise ModelError(f"{what}: cannot be read ({exc})") from exc
    else:
        download(str(spec["url"]), target, what)


def _get(spec: dict[str, Any], target: Path) -> None:
    get_file(spec, target, f"base model file {spec['name']}")


def _check_manifest(raw: bytes, digest: str) -> Manifest:
    actual = digest_of(raw)
    if actual != digest:
        raise ModelError(
            f"base model digest mismatch: manifest.json is {actual[:19]}..., "
            f"baseModel.digest says {digest[:19]}...; the model was replaced or the digest is stale"
        )
    try:
        return Manifest.from_json(raw.decode(), "base model manifest.json")
    except (ManifestError, UnicodeDecodeError) as exc:
        # Base manifests may list tokenizer .txt files, which the artifact name check refuses.
        try:
            data = json.loads(raw)
            return Manifest(
                str(data.get("kind", "base-model")),
                str(data.get("base_model_digest", "")),
                [
                    FileEntry(str(f["name"]), str(f["sha256"]), int(f["size"]))
                    for f in data["files"]
                ],
                dict(data.get("meta") or {}),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ModelError(f"base model manifest.json: {exc}") from exc


def _verify(path: Path, entry: Any) -> None:
    try:
        verify_file(path, entry)
    except ManifestError as exc:
        raise ModelError(f"base model {exc}") from exc


def prepare_model_dir(directory: Path, tool: str) -> Manifest:
    """Write manifest.json (every file's sha256 and size) for a save_pretrained folder; refuses
    pickle-based files. Returns the manifest, whose digest() a BaseModel pins."""
    files = sorted(
        p
        for p in directory.rglob("*")
        if p.is_file() and p.relative_to(directory).as_posix() != "manifest.json"
    )
    names = [p.relative_to(directory).as_posix() for p in files]
    for n in names:
        check_base_file_name(n)
    entries = [FileEntry(n, *sha256_file(p)) for n, p in zip(names, files, strict=True)]
    manifest = Manifest("base-model", "", entries, {"tool": tool})
    (directory / "manifest.json").write_text(manifest.to_json())
    return manifest
