"""The operator's API client against the local cluster: requests share pooled connections."""

from __future__ import annotations

from kubernetes import config

from medforge_operator.kube import Kube
from tests.conftest import ClusterAccess
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
