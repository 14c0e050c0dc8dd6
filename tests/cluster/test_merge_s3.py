"""`medforge-merge` through the real S3 server: inputs by presigned GET, outputs by presigned PUT,
no store credentials in the process."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from medforge_common.manifest import digest_of
from tests.conftest import Bucket
from tests.merge_helpers import BASE, make_adapter


def test_merge_job_with_presigned_urls(s3_bucket: Bucket, tmp_path: Path) -> None:
    s3 = s3_bucket.client
    inputs = []
    for i, rank in enumerate([4, 8]):
        digest, _ = make_adapter(tmp_path / f"a{i}", rank, i)
        files = []
        for name in ("manifest.json", "adapter.safetensors"):
            key = f"contributions/h{i}/a/1/{name}"
            s3.put_object(
                Bucket=s3_bucket.name, Key=key, Body=(tmp_path / f"a{i}" / name).read_bytes()
            )
            url = s3.generate_presigned_url(
                "get_object", Params={"Bucket": s3_bucket.name, "Key": key}, ExpiresIn=600
            )
            files.append({"name": name, "url": url})
        inputs.append({"namespace": f"h{i}", "name": "a", "digest": digest, "files": files})
    out = {
        name: s3.generate_presigned_url(
            "put_object",
            Params={"Bucket": s3_bucket.name, "Key": f"composites/f/rev-1/{name}"},
            ExpiresIn=600,
        )
        for name in ("adapter.safetensors", "manifest.json", "result.json")
    }
    cfg = {
        "kind": "merge",
        "baseModel": {"digest": BASE, "files": []},
        "integration": "full",
        "strategy": {"type": "svd", "rank": 4},
        "inputs": inputs,
        "output": {"uri": f"s3://{s3_bucket.name}/composites/f/rev-1/", "files": out},
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["MEDFORGE_JOB_CONFIG"] = json.dumps(cfg)
    term = tmp_path / "termination-log"
    proc = subprocess.run(
        [sys.executable, "-m", "medforge_merger", "--termination-log", str(term)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    ref = json.loads(term.read_text())
    body = s3.get_object(Bucket=s3_bucket.name, Key="composites/f/rev-1/result.json")["Body"].read()
    assert ref["resultFile"]["digest"] == digest_of(body)
    result = json.loads(body)
    manifest = s3.get_object(Bucket=s3_bucket.name, Key="composites/f/rev-1/manifest.json")[
        "Body"
    ].read()
    assert result["artifact"]["digest"] == digest_of(manifest)
    entry = json.loads(manifest)["files"][0]
    blob = s3.get_object(Bucket=s3_bucket.name, Key="composites/f/rev-1/adapter.safetensors")[
        "Body"
    ].read()
    assert hashlib.sha256(blob).hexdigest() == entry["sha256"]
    assert [i["state"] for i in result["inputs"]] == ["Included", "Included"]
