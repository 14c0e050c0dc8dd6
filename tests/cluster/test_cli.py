"""`medforge` against the local cluster and store, as a hospital's engineer and a platform team
use it: push a real save_pretrained folder (nested, tokenizer files) and register it, follow a
contribution and a composite, pull a revision with every digest checked; every failure one line
and a non-zero exit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from medforge_localcluster.s3 import client
from medforge_ml import synthetic
from tests.cluster.conftest import Forge, OperatorProcess
from tests.cluster.test_composite import composite_doc
from tests.cluster.test_composite import contribution as shared_contribution
from tests.conftest import ClusterAccess

pytestmark = pytest.mark.usefixtures("operator")


def medforge(
    cluster: ClusterAccess, forge: Forge, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full = dict(
        os.environ,
        KUBECONFIG=str(cluster.kubeconfig),
        MEDFORGE_STORE_ENDPOINT=forge.endpoint,
        MEDFORGE_STORE_BUCKET=forge.bucket,
        MEDFORGE_STORE_ACCESS_KEY_ID=forge.access_key,
        MEDFORGE_STORE_SECRET_ACCESS_KEY=forge.secret_key,
    )
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "medforge_cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=full,
    )


def one_line_failure(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medforge: "), proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_push_register_follow_and_pull(
    cluster: ClusterAccess,
    namespace: str,
    forge_namespace: str,
    forge: Forge,
    operator: OperatorProcess,
    tmp_path: Path,
) -> None:
    # A real save_pretrained folder with its tokenizer (merges.txt, vocab.json) and a nested one.
    model = synthetic.tiny_clip(tmp_path / "clip")
    (model / "merges.txt").write_text("#version: 0.2\n")  # as a slow CLIP tokenizer saves it
    shutil.copytree(model, model / "image_encoder", ignore=shutil.ignore_patterns("image_encoder"))
    name = f"clip-cli-{namespace[-6:]}"
    pushed = medforge(cluster, forge, "model", "push", str(model), "--name", name, "--register")
    assert pushed.returncode == 0, pushed.stderr
    digest = next(w for w in pushed.stdout.split() if w.startswith("sha256:"))
    waited = medforge(cluster, forge, "wait", "basemodel", name, "--timeout", "60")
    assert waited.returncode == 0, waited.stdout + waited.stderr
    bm = json.loads(cluster.kubectl("get", "basemodel", name, "-o", "json").stdout)
    assert bm["status"]["digest"] == digest and "image_encoder/config.json" in bm["status"]["files"]
    assert "merges.txt" in bm["status"]["files"]

    # Without --register: the YAML to apply, which the API server accepts.
    again = medforge(cluster, forge, "model", "push", str(model), "--name", name + "-yaml")
    assert again.returncode == 0, again.stderr
    doc = yaml.safe_load(again.stdout.split("---\n", 1)[1])
    assert doc["kind"] == "BaseModel" and doc["spec"]["digest"].startswith("sha256:")
    cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(doc))

    assert medforge(cluster, forge, "model", "verify", name, "--digest", digest).returncode == 0

    # A hospital trains on it; the platform team follows it.
    base = (name, digest)
    cluster.apply(namespace, shared_contribution("cli", base, task="derm"))
    done = medforge(
        cluster, forge, "wait", "contribution", "cli", "-n", namespace, "--timeout", "120"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Succeeded" in done.stdout
    logs = medforge(cluster, forge, "logs", "cli", "-n", namespace)
    assert logs.returncode == 0 and "trained derm" in logs.stdout, logs.stderr
    cluster.apply(forge_namespace, composite_doc(base, None, minContributions=1))
    served = medforge(
        cluster,
        forge,
        "wait",
        "composite",
        "forge",
        "-n",
        forge_namespace,
        "--revision",
        "1",
        "--timeout",
        "120",
    )
    assert served.returncode == 0, served.stdout + served.stderr
    status = medforge(cluster, forge, "status", "-A")
    assert status.returncode == 0
    rows = status.stdout.splitlines()
    assert any(namespace in r and " cli " in f" {r} " and "Succeeded" in r for r in rows)
    assert any(forge_namespace in r and "Ready" in r for r in rows)
    described = medforge(cluster, forge, "describe", "composite", "forge", "-n", forge_namespace)
    assert described.returncode == 0, described.stderr
    assert "Revisions (newest first)" in described.stdout and "Accepted" in described.stdout
    assert "Accuracy per task over revisions" in described.stdout and "derm" in described.stdout

    # The revision leaves the forge with every digest checked.
    out = tmp_path / "pulled"
    pulled = medforge(
        cluster,
        forge,
        "composite",
        "pull",
        "forge",
        "-n",
        forge_namespace,
        "--format",
        "raw",
        "-o",
        str(out),
    )
    assert pulled.returncode == 0, pulled.stderr
    report = json.loads((out / "medforge-export.json").read_text())
    current = json.loads(
        cluster.kubectl("get", "cmodel", "forge", "-n", forge_namespace, "-o", "json").stdout
    )["status"]["current"]
    assert report["digest"] == current["digest"] and (out / "adapter.safetensors").is_file()

    # Tampering in the store is caught, named, and nothing is left half-written.
    s3 = client(forge.endpoint, forge.access_key, forge.secret_key)
    bucket, _, key = current["uri"].removeprefix("s3://").partition("/")
    s3.put_object(Bucket=bucket, Key=key + "adapter.safetensors", Body=b"tampered")
    bad = medforge(
        cluster,
        forge,
        "composite",
        "pull",
        "forge",
        "-n",
        forge_namespace,
        "-o",
        str(tmp_path / "bad"),
        "--format",
        "raw",
    )
    one_line_failure(bad, "adapter.safetensors", "does not match")
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())
    s3.put_object(Bucket=forge.bucket, Key=f"base-models/{name}/merges.txt", Body=b"#changed")
    one_line_failure(medforge(cluster, forge, "model", "verify", name), "merges.txt")


def test_failures_are_one_clear_line(
    cluster: ClusterAccess, forge: Forge, namespace: str, tmp_path: Path
) -> None:
    one_line_failure(
        medforge(cluster, forge, "describe", "composite", "nope", "-n", namespace), "not found"
    )
    missing = medforge(cluster, forge, "status", "--kubeconfig", str(tmp_path / "none"))
    one_line_failure(missing, "kubeconfig")
    assert missing.returncode == 2
    down = medforge(
        cluster,
        forge,
        "model",
        "verify",
        "x",
        env={"MEDFORGE_STORE_ENDPOINT": "http://127.0.0.1:9"},
    )
    one_line_failure(down, "cannot reach the forge store")
    # A user without MedForge rights: told what to ask for, no traceback.
    cluster.kubectl("create", "serviceaccount", "nobody", "-n", namespace)
    token = cluster.kubectl("create", "token", "nobody", "-n", namespace).stdout.strip()
    cfg: dict[str, Any] = yaml.safe_load(cluster.kubeconfig.read_text())
    cfg["users"] = [{"name": cfg["contexts"][0]["context"]["user"], "user": {"token": token}}]
    cfg["contexts"][0]["context"]["namespace"] = namespace
    (tmp_path / "nobody").write_text(yaml.safe_dump(cfg))
    denied = medforge(cluster, forge, "status", "--kubeconfig", str(tmp_path / "nobody"))
    one_line_failure(denied, "may not", "medforge-viewer")
    # Pickle is refused before anything is uploaded.
    folder = synthetic.tiny_clip(tmp_path / "pickled")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    refused = medforge(cluster, forge, "model", "push", str(folder), "--name", "pickled")
    one_line_failure(refused, "pytorch_model.bin", "pickle")
    assert refused.returncode == 2
    s3 = client(forge.endpoint, forge.access_key, forge.secret_key)
    listed = s3.list_objects_v2(Bucket=forge.bucket, Prefix="base-models/pickled/")
    assert listed.get("KeyCount", 0) == 0
