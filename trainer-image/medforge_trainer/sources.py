"""Where the trainer's bytes come from and go to: the base model (presigned URLs or a local
directory, checked against its manifest's digest before use), the dataset (an S3 prefix read with
the institution's credentials from the job's env, or a local directory), and the outputs
(presigned PUT URLs, a local directory, or S3 when run by hand)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from medforge_common.manifest import (
    PICKLE_SUFFIXES,
    FileEntry,
    Manifest,
    ManifestError,
    verify_file,
)
from medforge_trainer.config import DatasetSettings, TrainConfig
from medforge_trainer.errors import TrainFailed

CHUNK = 1 << 20


def check_base_file_name(name: str) -> None:
    """Base models carry tokenizer files (merges.txt, vocab.json) besides safetensors; anything
    pickle-based is refused before a byte is read."""
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise TrainFailed(
            f"base model file {name}: pickle-based weights are refused because loading them can "
            "run code; save the model with safe_serialization (model.safetensors)"
        )
    if "/" in name or "\\" in name or name.startswith("."):
        raise TrainFailed(f"base model file {name!r}: expected a plain file name")


def download(url: str, target: Path, what: str) -> None:
    try:
        with urllib.request.urlopen(url, timeout=120) as r, target.open("wb") as out:  # noqa: S310
            shutil.copyfileobj(r, out, CHUNK)
    except urllib.error.HTTPError as exc:
        raise TrainFailed(f"{what}: the store answered HTTP {exc.code} (expired URL?)") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise TrainFailed(f"{what}: cannot be read ({exc})") from exc


def fetch_base_model(cfg: TrainConfig, dest: Path) -> Path:
    """The base model's directory, every file checked against the manifest whose sha256 is
    baseModel.digest. Returns the directory to load from."""
    return fetch_model_dir(cfg.base_digest, list(cfg.base_files), cfg.base_path, dest)


def fetch_model_dir(digest: str, files: list[dict[str, Any]], path: str | None, dest: Path) -> Path:
    """A verified base-model directory from presigned URLs / paths (`files`) or a local `path`
    (shared with the merger, which evaluates composites on the same base model)."""
    if path is not None and not files:
        src = Path(path)
        if not (src / "manifest.json").is_file():
            raise TrainFailed(
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
        raise TrainFailed("baseModel.files: the base model's manifest.json is not among them")
    _get(by_name["manifest.json"], dest / "manifest.json")
    manifest = _check_manifest((dest / "manifest.json").read_bytes(), digest)
    for entry in manifest.files:
        check_base_file_name(entry.name)
        if entry.name not in by_name:
            raise TrainFailed(f"base model file {entry.name}: listed in its manifest but not given")
        _get(by_name[entry.name], dest / entry.name)
        _verify(dest / entry.name, entry)
    return dest


def _get(spec: dict[str, Any], target: Path) -> None:
    if "path" in spec:
        try:
            shutil.copyfile(spec["path"], target)
        except OSError as exc:
            raise TrainFailed(f"base model file {spec['name']}: cannot be read ({exc})") from exc
    else:
        download(str(spec["url"]), target, f"base model file {spec['name']}")


def _check_manifest(raw: bytes, digest: str) -> Manifest:
    actual = "sha256:" + hashlib.sha256(raw).hexdigest()
    if actual != digest:
        raise TrainFailed(
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
            raise TrainFailed(f"base model manifest.json: {exc}") from exc


def _verify(path: Path, entry: Any) -> None:
    try:
        verify_file(path, entry)
    except ManifestError as exc:
        raise TrainFailed(f"base model {exc}") from exc


def s3_client(endpoint: str | None, access_key: str | None, secret_key: str | None) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=os.environ.get("AWS_REGION", "us-east-1"),
        config=Config(signature_version="s3v4", retries={"max_attempts": 3}),
    )


def materialize_dataset(ds: DatasetSettings, dest: Path) -> Path:
    """A local directory in ImageFolder layout: the path itself, or the S3 prefix copied under
    `dest` (read with DATASET_AWS_* credentials from the job's env, never logged)."""
    if not ds.uri.startswith("s3://"):
        root = Path(ds.uri.removeprefix("file://"))
        if not root.is_dir():
            raise TrainFailed(f"dataset unreadable: {root} is not a directory")
        return root
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, prefix = ds.uri[len("s3://") :].partition("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    access = os.environ.get("DATASET_AWS_ACCESS_KEY_ID") or os.environ.get("AWS_ACCESS_KEY_ID")
    secret = os.environ.get("DATASET_AWS_SECRET_ACCESS_KEY") or os.environ.get(
        "AWS_SECRET_ACCESS_KEY"
    )
    endpoint = ds.endpoint or os.environ.get("AWS_ENDPOINT_URL")
    s3 = s3_client(endpoint, access, secret)
    count = 0
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix) :].lstrip("/")
                if not rel or rel.endswith("/") or ".." in rel.split("/"):
                    continue
                target = dest / rel
                if not target.resolve().is_relative_to(dest.resolve()):
                    continue  # a key that would land outside the dataset folder
                target.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, obj["Key"], str(target))
                count += 1
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "error")
        raise TrainFailed(f"dataset unreadable: {ds.uri} answered {code}") from exc
    except (BotoCoreError, OSError) as exc:
        raise TrainFailed(f"dataset unreadable: {ds.uri} ({type(exc).__name__}: {exc})") from exc
    if count == 0:
        raise TrainFailed(f"dataset unreadable: {ds.uri} holds no files")
    return dest


def upload(name: str, source: Path, cfg: TrainConfig, output_dir: Path | None) -> None:
    """One output file to a directory (by hand), its presigned PUT URL, or S3 directly."""
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, output_dir / name)
        return
    url = cfg.output_files.get(name)
    if url:
        req = urllib.request.Request(url, data=source.read_bytes(), method="PUT")  # noqa: S310
        try:
            with urllib.request.urlopen(req, timeout=300) as r:  # noqa: S310
                if r.status not in (200, 201):
                    raise TrainFailed(f"upload of {name} answered HTTP {r.status}")
        except urllib.error.HTTPError as exc:
            raise TrainFailed(f"upload of {name} answered HTTP {exc.code} (expired URL?)") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise TrainFailed(f"upload of {name} failed ({exc})") from exc
        return
    if cfg.output_uri.startswith("s3://"):
        bucket, _, prefix = cfg.output_uri[len("s3://") :].partition("/")
        key = (prefix.rstrip("/") + "/" + name).lstrip("/")
        s3 = s3_client(
            os.environ.get("AWS_ENDPOINT_URL"),
            os.environ.get("AWS_ACCESS_KEY_ID"),
            os.environ.get("AWS_SECRET_ACCESS_KEY"),
        )
        try:
            s3.upload_file(str(source), bucket, key)
        except Exception as exc:  # boto3's transfer errors have no common base
            raise TrainFailed(f"upload of {name} to {cfg.output_uri} failed ({exc})") from exc
        return
    raise TrainFailed(
        f"output: no URL for {name}; run with --output-dir DIR or give output.uri s3://..."
    )
