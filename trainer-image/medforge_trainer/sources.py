"""Where the trainer's bytes come from and go to: the base model (presigned URLs or a local
directory, checked against its manifest's digest before use), the dataset (an S3 prefix read with
the institution's credentials from the job's env, or a local directory), and the outputs
(presigned PUT URLs, a local directory, or S3 when run by hand)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from medforge_common.artifacts import ADAPTER_FILE, MANIFEST_FILE, MIXTURE_FILE
from medforge_common.manifest import Manifest, ManifestError, digest_of, verify_file
from medforge_ml import transfers
from medforge_ml.basemodel import fetch_model_dir, get_file
from medforge_trainer.config import DatasetSettings, ParentSettings, TrainConfig
from medforge_trainer.errors import TrainFailed


def fetch_base_model(cfg: TrainConfig, dest: Path) -> Path:
    """The base model's directory, every file checked against the manifest whose sha256 is
    baseModel.digest. Returns the directory to load from."""
    return fetch_model_dir(cfg.base_digest, list(cfg.base_files), cfg.base_path, dest)


def fetch_parent(parent: ParentSettings, base_digest: str, dest: Path) -> Path:
    """The revision to train from (spec.startFrom), every file checked against the manifest
    whose sha256 the operator verified; refused when it was merged for another base model or
    is an output-level mixture (several models, none to train on). Returns its directory."""
    where = f"startFrom {parent.composite} revision {parent.revision}"
    directory = Path(parent.path) if parent.path is not None else dest
    given = {str(f["name"]): f for f in parent.files}
    if parent.path is None:
        dest.mkdir(parents=True, exist_ok=True)
        if MANIFEST_FILE not in given:
            raise TrainFailed(f"{where}: its manifest.json is not among startFrom.files")
        get_file(given[MANIFEST_FILE], dest / MANIFEST_FILE, f"{where} manifest.json")
    raw = (directory / MANIFEST_FILE).read_bytes()
    if digest_of(raw) != parent.digest:
        raise TrainFailed(
            f"{where}: manifest.json is {digest_of(raw)[:19]}..., not startFrom.digest "
            f"{parent.digest[:19]}...; the revision was replaced"
        )
    try:
        manifest = Manifest.from_json(raw.decode(), f"{where} manifest.json")
        if manifest.base_model_digest != base_digest:
            raise TrainFailed(f"{where} was merged for another base model than baseModel.digest")
        if any(e.name == MIXTURE_FILE for e in manifest.files):
            raise TrainFailed(
                f"{where} is an output-level mixture: no single model to train on "
                "(start from a composite that merges weights)"
            )
        # The merged update only: the revision's tasks file holds every hospital's distilled
        # set and head, which no hospital is given.
        wanted = [e for e in manifest.files if e.name == ADAPTER_FILE]
        if not wanted:
            raise TrainFailed(f"{where}: its manifest lists no {ADAPTER_FILE}")
        for entry in wanted:
            if parent.path is None:
                if entry.name not in given:
                    raise TrainFailed(f"{where}: {entry.name} is listed but not given")
                get_file(given[entry.name], dest / entry.name, f"{where} {entry.name}")
            verify_file(directory / entry.name, entry)
    except (ManifestError, UnicodeDecodeError) as exc:
        raise TrainFailed(f"{where}: {exc}") from exc
    return directory


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
        transfers.upload(url, source, name)  # retried with backoff on timeouts and 5xx
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
