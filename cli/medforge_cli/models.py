"""`medforge model push|verify` and `medforge composite pull`: models into and out of the forge
store, every byte checked against a manifest digest. No torch is imported here."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medforge_cli.errors import CliError
from medforge_common.manifest import (
    FileEntry,
    Manifest,
    ManifestError,
    check_model_file_name,
    digest_of,
    looks_like_pickle,
    sha256_file,
)

JSON = dict[str, Any]
MANIFEST = "manifest.json"
BASE_PREFIX = "base-models/"
PART = 64 * 1024 * 1024  # multipart threshold and part size
SKIPPED_DIRS = {".git", ".cache", "__pycache__", ".ipynb_checkpoints"}


@dataclass
class Store:
    client: Any
    bucket: str
    endpoint: str

    @classmethod
    def from_args(cls, args: argparse.Namespace, bucket: str | None = None) -> Store:
        import boto3
        from botocore.config import Config

        endpoint = args.endpoint or os.environ.get("MEDFORGE_STORE_ENDPOINT", "")
        bucket = bucket or args.bucket or os.environ.get("MEDFORGE_STORE_BUCKET", "")
        if not endpoint or not bucket:
            missing = (
                "--endpoint (or MEDFORGE_STORE_ENDPOINT)"
                if not endpoint
                else ("--bucket (or MEDFORGE_STORE_BUCKET)")
            )
            raise CliError(f"the forge store is not set: pass {missing}", 2)
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=args.region or os.environ.get("MEDFORGE_STORE_REGION", "us-east-1"),
            # Keys: MEDFORGE_STORE_ACCESS_KEY_ID/..._SECRET_ACCESS_KEY, else boto3's default
            # chain (AWS_* variables, a profile, the pod's or the machine's identity).
            aws_access_key_id=os.environ.get("MEDFORGE_STORE_ACCESS_KEY_ID") or None,
            aws_secret_access_key=os.environ.get("MEDFORGE_STORE_SECRET_ACCESS_KEY") or None,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                connect_timeout=10,
                retries={"max_attempts": 5, "mode": "standard"},
            ),
        )
        return cls(client, bucket, endpoint)

    @contextlib.contextmanager
    def errors(self, what: str) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NotFound"):
                raise CliError(f"{what}: not found in the forge store") from None
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise CliError(f"{what}: the store refused your credentials ({code})") from None
            raise CliError(f"{what}: the store answered {code or exc}") from None
        except BotoCoreError as exc:
            raise CliError(
                f"{what}: cannot reach the forge store at {self.endpoint} ({exc})"
            ) from None

    def read(self, key: str, limit: int = 16 << 20) -> bytes:
        with self.errors(f"s3://{self.bucket}/{key}"):
            obj = self.client.get_object(Bucket=self.bucket, Key=key)
            if int(obj.get("ContentLength", 0)) > limit:
                raise CliError(f"s3://{self.bucket}/{key} is larger than {limit} bytes")
            data: bytes = obj["Body"].read()
        return data

    def size(self, key: str) -> int:
        with self.errors(f"s3://{self.bucket}/{key}"):
            return int(self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"])

    def upload(self, path: Path, key: str, progress: Callable[[int], None]) -> None:
        from boto3.s3.transfer import TransferConfig

        cfg = TransferConfig(multipart_threshold=PART, multipart_chunksize=PART, max_concurrency=4)
        with self.errors(f"uploading {path.name}"):
            self.client.upload_file(str(path), self.bucket, key, Config=cfg, Callback=progress)

    def download_verified(self, key: str, entry: FileEntry, dest: Path) -> None:
        """Stream one file to `dest`, hashing as it comes; refuse it unless it matches."""
        import hashlib

        h = hashlib.sha256()
        size = 0
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self.errors(f"s3://{self.bucket}/{key}"):
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            with dest.open("wb") as f:
                for chunk in body.iter_chunks(1 << 20):
                    h.update(chunk)
                    size += len(chunk)
                    if size > entry.size:
                        break
                    f.write(chunk)
        if size != entry.size or h.hexdigest() != entry.sha256:
            dest.unlink(missing_ok=True)
            raise CliError(
                f"{entry.name}: the stored file does not match the manifest "
                f"({size} bytes, sha256 {h.hexdigest()[:12]}...; expected {entry.size} bytes, "
                f"{entry.sha256[:12]}...); it was changed or damaged in the store"
            )


class Progress:
    """One status line on a terminal; a line every 10 % otherwise (logs, CI)."""

    def __init__(self, total: int, what: str) -> None:
        self.total, self.done, self.what = max(total, 1), 0, what
        self.tty = sys.stderr.isatty()
        self.last = -1
        self.t0 = time.monotonic()

    def __call__(self, n: int) -> None:
        self.done += n
        pct = int(100 * self.done / self.total)
        if self.tty or pct // 10 != self.last // 10:
            rate = self.done / max(time.monotonic() - self.t0, 1e-6) / 1e6
            end = "\r" if self.tty else "\n"
            print(
                f"{self.what}: {pct:3d}% of {self.total / 1e6:.1f} MB ({rate:.1f} MB/s)",
                end=end,
                file=sys.stderr,
                flush=True,
            )
            self.last = pct

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def model_files(directory: Path) -> list[Path]:
    """Every file of a save_pretrained folder, nested folders included; pickle refused by name
    and by content, before anything is hashed or uploaded."""
    if not directory.is_dir():
        raise CliError(f"{directory}: not a folder (give a save_pretrained folder)", 2)
    files = []
    for root, dirs, names in os.walk(directory, followlinks=False):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and not d.startswith("."))
        for n in sorted(names):
            p = Path(root) / n
            rel = p.relative_to(directory).as_posix()
            if rel == MANIFEST or n.startswith("."):
                continue
            if p.is_symlink():
                raise CliError(f"{rel}: a symbolic link; copy the file itself into the folder", 2)
            try:
                check_model_file_name(rel)
            except ManifestError as exc:
                raise CliError(str(exc), 2) from None
            if looks_like_pickle(p):
                raise CliError(
                    f"{rel}: its content is a pickle (or a torch.save archive), which can run "
                    "code when loaded; save the model with safe_serialization=True",
                    2,
                )
            files.append(p)
    if not any(p.suffix == ".safetensors" for p in files):
        raise CliError(
            f"{directory}: no .safetensors weights (save_pretrained(..., "
            "safe_serialization=True) writes them)",
            2,
        )
    if not (directory / "config.json").is_file():
        raise CliError(f"{directory}: no config.json: not a save_pretrained folder", 2)
    return files


NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


def push(args: argparse.Namespace) -> int:
    if not NAME.match(args.name) or len(args.name) > 253:
        raise CliError(
            f"--name {args.name!r}: a BaseModel name is lower-case letters, digits, '-' and '.' "
            "(for example clip-vit-b16)",
            2,
        )
    directory = Path(args.directory)
    files = model_files(directory)
    store = Store.from_args(args)
    prefix = BASE_PREFIX + args.name.strip("/") + "/"
    entries = [FileEntry(p.relative_to(directory).as_posix(), *sha256_file(p)) for p in files]
    manifest = Manifest("base-model", "", entries, {"tool": "medforge model push"})
    body = manifest.to_json().encode()
    digest = manifest.digest()
    public_key = _sign(args, store, prefix, entries, body) if args.sign_key else None
    progress = Progress(sum(e.size for e in entries), f"uploading {len(entries)} files")
    for p, e in zip(files, entries, strict=True):
        store.upload(p, prefix + e.name, progress)
    progress.close()
    with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
        Path(tmp.name).write_bytes(body)
        store.upload(Path(tmp.name), prefix + MANIFEST, lambda _: None)  # last: the commit
    # What landed: every size, and the manifest's digest read back.
    for e in entries:
        if store.size(prefix + e.name) != e.size:
            raise CliError(f"{e.name}: the store holds another size than uploaded; push again")

    landed = digest_of(store.read(prefix + MANIFEST))
    if landed != digest:
        raise CliError("manifest.json in the store is not the one uploaded; push again")
    print(f"pushed {len(entries)} files to s3://{store.bucket}/{prefix}")
    print(f"digest {digest}")
    doc = basemodel_manifest(args.name, digest)
    if public_key is not None:
        doc["spec"]["publicKey"] = public_key  # the operator checks the signature against it
    if args.register:
        from medforge_cli.cluster import Cluster

        Cluster.connect(args.kubeconfig, args.context).apply_basemodel(doc)
        print(
            f"BaseModel {args.name} registered; the operator verifies it now "
            f"(medforge wait basemodel {args.name})"
        )
    else:
        print("register it (platform team):\n---")
        print(_yaml(doc), end="")
    return 0


def _sign(
    args: argparse.Namespace, store: Store, prefix: str, entries: list[FileEntry], body: bytes
) -> str:
    """Sign the model (every file's digest, computed once for the manifest, and the manifest's)
    in the OpenSSF model-signing format and upload the bundle; the public key's PEM."""
    from medforge_common import attestation as at

    key = Path(args.sign_key)
    try:
        pem = key.read_bytes()
        public = at.public_pem(pem)
    except OSError as exc:
        raise CliError(f"--sign-key {key}: {exc.strerror}", 2) from None
    except at.BadKey as exc:
        raise CliError(f"--sign-key {key}: {exc}", 2) from None
    files = {e.name: e.sha256 for e in entries} | {MANIFEST: hashlib.sha256(body).hexdigest()}
    stmt = at.statement(args.name, files, at.MODEL_PREDICATE, at.FILE_SERIALIZATION)
    with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
        Path(tmp.name).write_bytes(at.sign_statement(stmt, pem))
        store.upload(Path(tmp.name), prefix + at.SIGNATURE_FILE, lambda _: None)
    print(f"signed with key {at.key_id(public)[:16]} ({at.SIGNATURE_FILE})")
    return public.decode()


def basemodel_manifest(name: str, digest: str) -> JSON:
    return {
        "apiVersion": "medforge.io/v1alpha1",
        "kind": "BaseModel",
        "metadata": {"name": name},
        "spec": {"path": name, "digest": digest},
    }


def _yaml(doc: JSON) -> str:
    import yaml

    return str(yaml.safe_dump(doc, sort_keys=False))


def _model_key(args: argparse.Namespace) -> Any:
    """The key the model must be signed with (--public-key or --trust), or None."""
    from medforge_common import attestation as at

    if args.public_key:
        try:
            pem = Path(args.public_key).read_bytes()
            return at.TrustedKey(at.key_id(pem), pem, "--public-key", "")
        except OSError as exc:
            raise CliError(f"--public-key {args.public_key}: {exc.strerror}", 2) from None
        except at.BadKey as exc:
            raise CliError(f"--public-key {args.public_key}: {exc}", 2) from None
    if args.trust:
        from medforge_cli.trust import read_trust

        key = read_trust(args.trust).models.get(args.name)
        if key is None:
            raise CliError(f"--trust {args.trust} names no key for BaseModel {args.name}", 1)
        return key
    return None


def _verify_dir(args: argparse.Namespace, key: Any) -> int:
    from medforge_common.chain import ChainBroken, verify_model

    if key is None:
        raise CliError("--dir checks a signature: give --public-key or --trust", 2)
    folder = Path(args.dir)
    try:
        report = verify_model(folder, key, args.name)
    except ChainBroken as exc:
        raise CliError(f"chain of custody broken at {exc}", 1) from None
    digest = digest_of((folder / MANIFEST).read_bytes())
    if args.digest and digest != args.digest:
        raise CliError(f"manifest.json has digest {digest}, not {args.digest}", 1)
    print(f"verified {report['files']} files, digest {digest}, signed by key {key.key_id[:16]}")
    return 0


def _check_signature(store: Store, prefix: str, manifest: Manifest, raw: bytes, key: Any) -> None:
    """The stored bundle against `key`, over the digests just verified."""
    from medforge_common import attestation as at

    try:
        bundle = store.read(prefix + at.SIGNATURE_FILE, at.MAX_REVISION_SIGNATURE_BYTES)
    except CliError as exc:
        raise CliError(f"the model is not signed: {exc}", 1) from None
    files = {e.name: e.sha256 for e in manifest.files}
    files[MANIFEST] = hashlib.sha256(raw).hexdigest()
    try:
        signed = at.open_bundle(bundle, [key], f"BaseModel {prefix}")
        at.check_files(signed.statement, files)
    except at.SignatureProblem as exc:
        raise CliError(
            f"chain of custody broken at model signature: {exc.reason}: {exc}", 1
        ) from None
    print(f"ok  signed by key {key.key_id[:16]}")


def verify(args: argparse.Namespace) -> int:
    key = _model_key(args)
    if args.dir:
        return _verify_dir(args, key)
    store = Store.from_args(args)
    prefix = BASE_PREFIX + args.name.strip("/") + "/"
    raw = store.read(prefix + MANIFEST)
    digest = digest_of(raw)
    if args.digest and digest != args.digest:
        raise CliError(f"manifest.json has digest {digest}, not {args.digest}")
    try:
        manifest = Manifest.from_json(raw.decode(), f"s3://{store.bucket}/{prefix}{MANIFEST}")
    except (ManifestError, UnicodeDecodeError) as exc:
        raise CliError(str(exc)) from None
    with tempfile.TemporaryDirectory() as tmp:
        for e in manifest.files:
            store.download_verified(prefix + e.name, e, Path(tmp) / "f")
            print(f"ok  {e.name}  {e.size} bytes")
    if key is not None:
        _check_signature(store, prefix, manifest, raw, key)
    print(f"verified {len(manifest.files)} files, digest {digest}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.command == "model":
        return push(args) if args.action == "push" else verify(args)
    from medforge_cli.pull import pull

    return pull(args)
