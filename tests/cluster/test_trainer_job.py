"""The real `medforge-train` as a Job through the process kubelet: the Job is built by the
operator's own builders (presigned GET URLs for the base model, PUT URLs for the outputs), the
dataset is read from an S3 bucket with credentials from a Secret, and the artifact is verified
in the store the way the operator verifies it."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from kubernetes import config

from medforge_common.manifest import Manifest
from medforge_common.result import read_result
from medforge_common.uris import S3Uri
from medforge_operator import contribution
from medforge_operator.basemodel import Resolved
from medforge_operator.catalog import JobConfigs
from medforge_operator.kube import Kube
from medforge_operator.settings import Settings
from medforge_operator.store import ForgeStore
from tests.conftest import Bucket, ClusterAccess
from tests.helpers import get_json, wait_until
from tests.train_helpers import make_dataset, prepare, tiny_clip

CLASSES = ["adenocarcinoma", "benign", "squamous"]


def upload_dir(bucket: Bucket, directory: Path, prefix: str) -> None:
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            key = prefix + p.relative_to(directory).as_posix()
            bucket.client.put_object(Bucket=bucket.name, Key=key, Body=p.read_bytes())


def test_trainer_job_through_presigned_urls(
    cluster: ClusterAccess, namespace: str, s3_bucket: Bucket, tmp_path: Path
) -> None:
    base = tiny_clip(tmp_path / "clip")
    digest = prepare(base)
    upload_dir(s3_bucket, base, "base-models/clip-tiny/")
    # The hospital's own bucket, readable only with the credentials in its Secret.
    data_bucket = f"hospital-{uuid.uuid4().hex[:8]}"
    s3_bucket.client.create_bucket(Bucket=data_bucket)
    data = make_dataset(tmp_path / "lung", CLASSES, 24, seed=5)
    for p in sorted(data.rglob("*.png")):
        s3_bucket.client.put_object(
            Bucket=data_bucket, Key="lung/" + p.relative_to(data).as_posix(), Body=p.read_bytes()
        )
    cluster.kubectl(
        "-n",
        namespace,
        "create",
        "secret",
        "generic",
        "lung-data",
        f"--from-literal=AWS_ACCESS_KEY_ID={s3_bucket.access_key}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={s3_bucket.secret_key}",
    )
    obj: dict[str, Any] = {
        "apiVersion": "medforge.io/v1alpha1",
        "kind": "LoRAContribution",
        "metadata": {
            "name": "lung",
            "namespace": namespace,
            "uid": str(uuid.uuid4()),
            "generation": 1,
        },
        "spec": {
            "baseModel": {"name": "clip-tiny"},
            "task": {"name": "lung", "classes": CLASSES, "head": "clip-prompt"},
            "dataset": {
                "uri": f"s3://{data_bucket}/lung/",
                "endpoint": s3_bucket.endpoint,
                "credentialsSecretRef": {"name": "lung-data"},
                "validationFraction": 0.25,
            },
            "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, "targetModules": ["q_proj", "v_proj"]},
            "training": {"epochs": 4, "batchSize": 16, "learningRate": 0.005, "seed": 1},
            "distillation": {"imagesPerClass": 2, "iterations": 20},
        },
    }
    settings = Settings(
        s3_bucket.endpoint, s3_bucket.name, s3_bucket.access_key, s3_bucket.secret_key
    )
    store = ForgeStore(settings)
    out = contribution.output_prefix(s3_bucket.name, obj, 1)
    files = Manifest.from_json((base / "manifest.json").read_text()).files
    resolved = Resolved(
        "clip-tiny",
        digest,
        S3Uri(s3_bucket.name, "base-models/clip-tiny/"),
        tuple(f.name for f in files),
    )
    plan = contribution.train_plan(obj, resolved, out)
    job = contribution.training_job(obj, settings, resolved)
    # No LoRAContribution object exists here: without this, garbage collection would remove
    # the Job as an orphan of the made-up owner.
    job["metadata"].pop("ownerReferences")
    env = json.dumps(job["spec"]["template"]["spec"]["containers"][0]["env"])
    assert s3_bucket.secret_key not in env  # credentials only through secretKeyRef
    config.load_kube_config(str(cluster.kubeconfig))  # type: ignore[no-untyped-call]
    kube = Kube(pool_size=2)
    created, _ = kube.create_job(job)
    # The config Secret (presigned URLs) follows the Job, as the operator writes it.
    grant = contribution.training_grant(s3_bucket.name, obj, resolved)
    JobConfigs(kube, store).ensure(created, plan, grant, 3600)

    def finished() -> dict[str, Any] | None:
        st = get_json(cluster, "job", job["metadata"]["name"], "-n", namespace).get("status", {})
        return st if st.get("succeeded") or st.get("failed") else None

    st = wait_until(finished, 240, every=1, what="the training Job")
    pods = get_json(cluster, "pods", "-n", namespace, "-l", f"job-name={job['metadata']['name']}")
    cs = pods["items"][0]["status"]["containerStatuses"][0]
    message = cs["state"]["terminated"].get("message", "")
    assert st.get("succeeded") == 1, message
    result = read_result(message)
    assert result is not None and result["metrics"]["accuracy"] > 0.6
    verified = contribution.verified_prefix(s3_bucket.name, obj, result["artifact"]["digest"])
    manifest = store.verify_copy(out, verified, result["artifact"]["digest"])
    assert contribution.manifest_matches_spec(manifest.meta, obj["spec"]) is None
    assert manifest.base_model_digest == digest
    assert {f.name for f in manifest.files} == {
        "adapter.safetensors",
        "distilled.safetensors",
        "fingerprints.json",
    }
    assert manifest.meta["task"] == "lung" and manifest.meta["samples"]["validation"] == 18
    logs = cluster.kubectl("-n", namespace, "logs", f"job/{job['metadata']['name']}").stdout
    assert "base model sha256:" in logs and "img/s eta" in logs
    assert s3_bucket.secret_key not in logs
