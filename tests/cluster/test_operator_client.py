"""The operator's clients against the local cluster and the S3 server: API requests share
pooled connections; a Job's config Secret carries working URLs and is signed afresh only when
they have lived half their lifetime."""

from __future__ import annotations

import base64
import json
import time
import urllib.request
from typing import Any

import pytest
from kubernetes import config

from medforge_operator import jobs, signing
from medforge_operator.catalog import JobConfigs
from medforge_operator.kube import Kube
from medforge_operator.settings import Settings
from medforge_operator.store import ForgeStore
from tests.conftest import Bucket, ClusterAccess
from tests.helpers import get_json


def test_events_and_jobs_reuse_one_connection(cluster: ClusterAccess, namespace: str) -> None:
    """Every response is read to its end, so sequential requests reuse one connection: an
    unread one (the Events, once) cost a new TLS handshake for every request after it."""
    config.load_kube_config(str(cluster.kubeconfig))  # type: ignore[no-untyped-call]
    kube = Kube(pool_size=4)
    owner = {"kind": "ConfigMap", "metadata": {"name": "owner", "namespace": namespace}}
    for i in range(5):
        kube.post_event(owner, "Normal", "ClientTest", f"event {i}")
        job = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": f"client-{i}", "namespace": namespace},
            "spec": {
                "suspend": True,
                "template": {
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [{"name": "c", "image": "none", "command": ["true"]}],
                    }
                },
            },
        }
        kube.create_job(job)
        assert kube.get_job(namespace, f"client-{i}") is not None
        assert kube.job_pods(namespace, kube.get_job(namespace, f"client-{i}") or {}) == []
    api = kube.core.api_client
    pool = api.rest_client.pool_manager.connection_from_url(api.configuration.host)
    assert pool.num_connections == 1
    events = get_json(cluster, "events", "-n", namespace, "--field-selector=reason=ClientTest")
    assert sorted(e["message"] for e in events["items"]) == [f"event {i}" for i in range(5)]


def test_job_config_secret_is_signed_when_needed(
    cluster: ClusterAccess, namespace: str, s3_bucket: Bucket
) -> None:
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="m/config.json", Body=b"{}")
    settings = Settings(
        s3_bucket.endpoint,
        s3_bucket.name,
        s3_bucket.access_key,
        s3_bucket.secret_key,
        presign_expiry_seconds=100,
    )
    config.load_kube_config(str(cluster.kubeconfig))  # type: ignore[no-untyped-call]
    kube = Kube(pool_size=2)
    plan = {"files": [{"name": "config.json", "get": f"s3://{s3_bucket.name}/m/config.json"}]}
    job = jobs.job_manifest(
        name="signed",
        namespace=namespace,
        owner={"kind": "ConfigMap", "metadata": {"name": "o", "uid": "u"}},
        component="train",
        image="none",
        command=["true"],
        annotations={},
        env=[],
        labels={},
        resources={"queueName": "q"},  # suspended: no pod ever runs
        volumes=[],
        volume_mounts=[],
        backoff_limit=0,
        active_deadline=None,
        ttl_seconds=60,
    )
    job["metadata"].pop("ownerReferences")
    created, made = kube.create_job(job)
    again, made_again = kube.create_job(job)
    # the same Job comes back, not a second one (its status may have moved on meanwhile)
    assert made and not made_again
    assert again["metadata"]["uid"] == created["metadata"]["uid"]
    configs = JobConfigs(kube, ForgeStore(settings))
    grant = signing.Grant(s3_bucket.name, frozenset({"m/config.json"}), frozenset())

    def secret() -> dict[str, Any]:
        out: dict[str, Any] = get_json(cluster, "secret", "signed-config", "-n", namespace)
        return out

    with pytest.raises(signing.SigningRefused):  # a key outside the grant: nothing written
        configs.ensure(created, {"x": {"put": f"s3://{s3_bucket.name}/m/config.json"}}, grant, 100)
    configs.ensure(created, plan, grant, 100)
    first = secret()
    assert first["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
    cfg = json.loads(base64.b64decode(first["data"]["config.json"]))
    with urllib.request.urlopen(cfg["files"][0]["url"], timeout=10) as resp:
        assert resp.read() == b"{}"
    configs.ensure(created, plan, grant, 100)  # fresh: nothing written
    assert secret()["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
    configs._expires[created["metadata"]["uid"]] -= 60  # past half its lifetime
    time.sleep(1.1)  # a new signature carries a new X-Amz-Date
    configs.ensure(created, plan, grant, 100)
    again = secret()
    assert again["metadata"]["resourceVersion"] != first["metadata"]["resourceVersion"]
    configs.forget(created)


def test_every_object_is_listed_a_page_at_a_time(cluster: ClusterAccess, crds: None) -> None:
    tag = f"paging-{int(time.time() * 1000) % 10**9}"
    for i in range(5):
        doc = {
            "apiVersion": "medforge.io/v1alpha1",
            "kind": "BaseModel",
            "metadata": {"name": f"{tag}-{i}", "labels": {"paging": tag}},
            "spec": {},
        }
        cluster.kubectl("apply", "-f", "-", input=json.dumps(doc))
    config.load_kube_config(str(cluster.kubeconfig))  # type: ignore[no-untyped-call]
    kube = Kube(pool_size=2)
    try:
        names = [
            o["metadata"]["name"]
            for o in kube.iter_objects("basemodels", None, f"paging={tag}", page=2)
        ]
        assert sorted(names) == [f"{tag}-{i}" for i in range(5)]
    finally:
        cluster.kubectl("delete", "basemodels", "-l", f"paging={tag}", check=False)
