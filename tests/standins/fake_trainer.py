"""Stand-in trainer: checks the base model through its presigned URLs, uploads an adapter and a
manifest through presigned PUT URLs, writes the result JSON to the termination message."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from medforge_common.attestation import SIGNATURE_FILE, sign_folder
from medforge_common.manifest import FileEntry, Manifest, digest_of
from medforge_ml import transfers

TERM = Path("/dev/termination-log")


def fail(reason: str) -> None:
    TERM.write_text(reason)
    print(reason, file=sys.stderr)
    sys.exit(1)


def put(url: str, data: bytes) -> None:
    """Through the shared transfers, as the real trainer: a store outage is retried."""
    with tempfile.NamedTemporaryFile() as f:
        f.write(data)
        f.flush()
        transfers.upload(url, Path(f.name), "output")


def sign(files: dict[str, bytes], key: Path) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "out"
        folder.mkdir()
        for name, data in files.items():
            (folder / name).write_bytes(data)
        sign_folder(folder, key, Path(tmp) / SIGNATURE_FILE)
        return (Path(tmp) / SIGNATURE_FILE).read_bytes()


def read_parent(parent: dict) -> None:  # type: ignore[type-arg]
    """As the real trainer: the revision's update, checked against its digest; the stand-in
    fails if it is given anything but the manifest and the update."""
    given = {f["name"]: f["url"] for f in parent["files"]}
    if set(given) != {"manifest.json", "adapter.safetensors"}:
        fail(f"startFrom: given {sorted(given)}, not the manifest and update only")
    with urllib.request.urlopen(given["manifest.json"], timeout=30) as r:
        if digest_of(r.read()) != parent["digest"]:
            fail("startFrom: the revision was replaced")
    with urllib.request.urlopen(given["adapter.safetensors"], timeout=30) as r:
        r.read()


def main() -> None:
    cfg = json.loads(Path(os.environ["MEDFORGE_JOB_CONFIG_FILE"]).read_text())
    task = cfg["task"]["name"]
    if re.fullmatch(r"slow-[0-9.]+", task):  # "slow-N": trains for N seconds
        time.sleep(float(task.split("-")[1]))
    if task.startswith("fail"):
        fail("dataset unreadable: s3://hospital/data/ holds no class folders")
    base = {f["name"]: f["url"] for f in cfg["baseModel"]["files"]}
    with urllib.request.urlopen(base["manifest.json"], timeout=30) as r:
        raw = r.read()
    if digest_of(raw) != cfg["baseModel"]["digest"]:
        fail("base model digest mismatch")
    if cfg["dataset"].get("credentialsFromEnv"):
        assert (
            os.environ["DATASET_AWS_ACCESS_KEY_ID"] and os.environ["DATASET_AWS_SECRET_ACCESS_KEY"]
        )
    parent = cfg.get("startFrom")
    if parent:
        read_parent(parent)
    c = cfg["contribution"]
    adapter = (
        hashlib.sha256(f"{c['namespace']}/{c['name']}/{c['generation']}".encode()).digest() * 64
    )
    manifest = Manifest(
        "contribution",
        cfg["baseModel"]["digest"],
        [FileEntry("adapter.safetensors", hashlib.sha256(adapter).hexdigest(), len(adapter))],
        {
            "task": task,
            "classes": cfg["task"]["classes"],
            "metrics": {"accuracy": 0.81, "f1": 0.8, "auc": 0.88, "samples": 120},
            "rank": cfg["lora"].get("rank"),
            "targetModules": cfg["lora"].get("targetModules"),
            # The figures the real trainer reports (the operator exports them as metrics).
            "training": {"imagesPerSecond": 250.0, "seconds": 1.5, "loss": 0.42, "epochs": 1},
        },
    )
    if parent:  # a "lie-parent" task names a revision its Job was not given
        lie = 1 if task.startswith("lie-parent") else 0
        manifest.meta["parent"] = {
            "composite": parent["composite"],
            "revision": parent["revision"] + lie,
            "digest": parent["digest"],
        }
    if task.startswith("float-epochs"):  # a figure of the wrong type for the CRD
        manifest.meta["training"]["epochs"] = 3.5
    if task.startswith("wrong-task"):  # a manifest for another task than the spec's
        manifest.meta["task"] = "someone-elses"
    body = manifest.to_json().encode()
    if task.startswith("bad-manifest"):  # a hostile manifest: meta a list, a file twice
        raw = json.loads(body)
        raw["meta"] = ["not", "an", "object"]
        raw["files"] = raw["files"] * 2
        body = json.dumps(raw).encode()
    out = cfg["output"]["files"]
    key = (cfg.get("signing") or {}).get("keyFile")
    if key:  # as the real trainer: the folder signed with the mounted key
        signature = sign({"adapter.safetensors": adapter, "manifest.json": body}, Path(key))
        if task.startswith("tamper-signed"):  # changed after signing, the manifest to match
            adapter = adapter[::-1]
            manifest.files = [
                FileEntry("adapter.safetensors", hashlib.sha256(adapter).hexdigest(), len(adapter))
            ]
            body = manifest.to_json().encode()
        put(out[SIGNATURE_FILE], signature)
    put(out["adapter.safetensors"], adapter[::-1] if task.startswith("corrupt") else adapter)
    put(out["manifest.json"], body)
    print(f"trained {task}: uploaded {len(adapter)} bytes")
    result = {
        "artifact": {
            "uri": cfg["output"]["uri"],
            "digest": digest_of(body),
            "sizeBytes": len(adapter),
        },
        "metrics": {"accuracy": 0.81, "f1": 0.8, "auc": 0.88, "samples": 120},
    }
    TERM.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
