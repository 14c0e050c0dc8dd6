"""The operator's clients against the local cluster and the S3 server: API requests share
pooled connections; base-model URLs are listed and signed once per burst."""

from __future__ import annotations

import time
import urllib.request

import pytest
from kubernetes import config

from medforge_operator.kube import Kube
from medforge_operator.reconcile_contribution import base_model_files
from medforge_operator.settings import Settings
from medforge_operator.store import ForgeStore, VerificationFailed
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
        assert kube.job_pods(namespace, f"client-{i}") == []
    api = kube.core.api_client
    pool = api.rest_client.pool_manager.connection_from_url(api.configuration.host)
    assert pool.num_connections == 1
    events = get_json(cluster, "events", "-n", namespace, "--field-selector=reason=ClientTest")
    assert sorted(e["message"] for e in events["items"]) == [f"event {i}" for i in range(5)]


def test_base_model_urls_are_signed_once_per_burst(s3_bucket: Bucket) -> None:
    """A burst of contributions for one base model gets the same presigned URLs (one listing,
    one signing); a tenth of the URLs' lifetime later they are listed and signed afresh."""
    for name, body in (("manifest.json", b"{}"), ("config.json", b'{"model_type": "clip"}')):
        s3_bucket.client.put_object(Bucket=s3_bucket.name, Key=f"cached/{name}", Body=body)
    settings = Settings(
        s3_bucket.endpoint,
        s3_bucket.name,
        s3_bucket.access_key,
        s3_bucket.secret_key,
        presign_expiry_seconds=100,  # cached for 10 s
    )
    store = ForgeStore(settings)
    spec = {"baseModel": {"uri": f"s3://{s3_bucket.name}/cached/"}}
    t0 = time.monotonic()
    first = base_model_files(store, spec)
    assert sorted(f["name"] for f in first) == ["config.json", "manifest.json"]
    time.sleep(1.1)  # a new signature would carry a new X-Amz-Date
    assert base_model_files(store, spec) == first
    config_url = next(f["url"] for f in first if f["name"] == "config.json")
    with urllib.request.urlopen(config_url, timeout=10) as resp:
        assert resp.read() == b'{"model_type": "clip"}'
    # The manifest goes away: the cached listing still has it, a fresh one does not.
    s3_bucket.client.delete_object(Bucket=s3_bucket.name, Key="cached/manifest.json")
    assert base_model_files(store, spec) == first
    assert time.monotonic() - t0 < 10, "the cached calls took longer than the cache lasts"
    time.sleep(10.5 - (time.monotonic() - t0))
    with pytest.raises(VerificationFailed, match=r"holds no manifest\.json"):
        base_model_files(store, spec)
