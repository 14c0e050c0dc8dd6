"""The local control plane behaves like a cluster: schema validation, Jobs through the process
kubelet, CreateContainerConfigError, PodSecurity, garbage collection, logs."""

from __future__ import annotations

import json
import textwrap
from typing import Any

from medforge_localcluster.kube import Kube
from tests.conftest import ClusterAccess
from tests.helpers import get_json, wait_until

WIDGET_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.test.medforge.io
spec:
  group: test.medforge.io
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              required: [size]
              properties:
                size: {type: integer, minimum: 1, maximum: 10}
"""


def job(
    name: str,
    script: str,
    backoff: int = 0,
    extra_container: dict[str, Any] | None = None,
    extra_spec: dict[str, Any] | None = None,
) -> str:
    container: dict[str, Any] = {
        "name": "main",
        "image": "python:3.11",
        "command": ["python", "-c", textwrap.dedent(script)],
        **(extra_container or {}),
    }
    return json.dumps(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": name},
            "spec": {
                "backoffLimit": backoff,
                "template": {
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [container],
                        **(extra_spec or {}),
                    }
                },
            },
        }
    )


def job_condition(cluster: ClusterAccess, ns: str, name: str) -> str | None:
    obj = get_json(cluster, "job", name, "-n", ns)
    for c in obj.get("status", {}).get("conditions", []):
        if c["type"] in ("Complete", "Failed") and c["status"] == "True":
            return str(c["type"])
    return None


def pods_of(cluster: ClusterAccess, ns: str, job_name: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = get_json(cluster, "pods", "-n", ns, "-l", f"job-name={job_name}")[
        "items"
    ]
    return items


def test_crd_and_custom_resources_are_validated(cluster: ClusterAccess, namespace: str) -> None:
    cluster.kubectl("apply", "-f", "-", input=WIDGET_CRD)
    wait_until(
        lambda: (
            cluster.kubectl(
                "get",
                "crd",
                "widgets.test.medforge.io",
                "-o",
                "jsonpath={.status.conditions[?(@.type=='Established')].status}",
            ).stdout
            == "True"
        ),
        what="CRD established",
    )
    good = "apiVersion: test.medforge.io/v1\nkind: Widget\nmetadata: {name: ok}\nspec: {size: 3}\n"
    out = cluster.apply(namespace, good)
    assert "widget.test.medforge.io/ok created" in out.stdout
    assert get_json(cluster, "widget", "ok", "-n", namespace)["spec"]["size"] == 3

    bad = good.replace("name: ok", "name: bad").replace("size: 3", "size: 100")
    refused = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=bad, check=False)
    assert refused.returncode != 0
    assert "spec.size" in refused.stderr and "less than or equal to 10" in refused.stderr


def test_job_completes_through_the_process_kubelet(cluster: ClusterAccess, namespace: str) -> None:
    script = """
        import os, pathlib, sys
        # env from a value, a fieldRef and $(VAR) expansion
        assert os.environ["GREETING"] == "hello " + os.environ["POD_NS"], dict(os.environ)
        pathlib.Path("/scratch-medforge/out.txt").write_text("written")
        assert pathlib.Path("/scratch-medforge/out.txt").read_text() == "written"
        pathlib.Path("/dev/termination-log").write_text('{"ok": true}')
        print("job ran in", os.environ["POD_NS"])
    """
    container = {
        "env": [
            {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "GREETING", "value": "hello $(POD_NS)"},
        ],
        "volumeMounts": [{"name": "scratch", "mountPath": "/scratch-medforge"}],
    }
    spec = {"volumes": [{"name": "scratch", "emptyDir": {}}]}
    cluster.apply(namespace, job("hello", script, extra_container=container, extra_spec=spec))
    assert wait_until(lambda: job_condition(cluster, namespace, "hello"), 90) == "Complete"

    (pod,) = pods_of(cluster, namespace, "hello")
    assert pod["spec"]["nodeName"] == "medforge-local"
    assert pod["status"]["phase"] == "Succeeded"
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 0 and term["reason"] == "Completed"
    assert json.loads(term["message"]) == {"ok": True}
    logs = cluster.kubectl("logs", "-n", namespace, "job/hello").stdout
    assert f"job ran in {namespace}" in logs


def test_metadata_lists_are_empty_or_carry_metadata_only(
    cluster: ClusterAccess, namespace: str
) -> None:
    """The benchmark's cheap poll: the API server answers an empty PartialObjectMetadataList
    with `items: null`, which must read as no objects, not break the poller."""
    kube = Kube.from_kubeconfig(cluster.kubeconfig)
    path = f"/apis/batch/v1/namespaces/{namespace}/jobs"
    assert kube.list_metadata(path, labelSelector="app=listed") == []
    cluster.apply(namespace, job("listed", "print('listed')"))
    cluster.kubectl("label", "-n", namespace, "job/listed", "app=listed")
    (item,) = kube.list_metadata(path, labelSelector="app=listed")
    assert item["metadata"]["name"] == "listed" and "spec" not in item


def test_failing_job_fails_after_backoff_limit(cluster: ClusterAccess, namespace: str) -> None:
    script = """
        import pathlib, sys
        pathlib.Path("/dev/termination-log").write_text("bad input: no data")
        sys.exit(3)
    """
    cluster.apply(namespace, job("fails", script, backoff=1))
    assert wait_until(lambda: job_condition(cluster, namespace, "fails"), 120) == "Failed"
    j = get_json(cluster, "job", "fails", "-n", namespace)
    failed = next(c for c in j["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "BackoffLimitExceeded"
    assert j["status"]["failed"] == 2  # the first try plus backoffLimit=1 retry
    for pod in pods_of(cluster, namespace, "fails"):
        term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
        assert term["exitCode"] == 3
        assert term["message"] == "bad input: no data"


def test_missing_secret_shows_create_container_config_error(
    cluster: ClusterAccess, namespace: str
) -> None:
    container = {
        "env": [
            {
                "name": "TOKEN",
                "valueFrom": {"secretKeyRef": {"name": "store-credentials", "key": "token"}},
            }
        ]
    }
    script = "import os; assert os.environ['TOKEN'] == 's3cr3t'"
    cluster.apply(namespace, job("needs-secret", script, extra_container=container))

    def waiting() -> dict[str, Any] | None:
        pods = pods_of(cluster, namespace, "needs-secret")
        for cs in (pods[0]["status"].get("containerStatuses") or []) if pods else []:
            w = cs["state"].get("waiting")
            if w and w["reason"] == "CreateContainerConfigError":
                return dict(w)
        return None

    state = wait_until(waiting, 60, what="CreateContainerConfigError")
    assert state["message"] == 'secret "store-credentials" not found'
    assert "CreateContainerConfigError" in cluster.kubectl("get", "pods", "-n", namespace).stdout

    # As with a kubelet, the pod starts once the Secret exists.
    cluster.kubectl(
        "create",
        "secret",
        "generic",
        "store-credentials",
        "-n",
        namespace,
        "--from-literal=token=s3cr3t",
    )
    assert wait_until(lambda: job_condition(cluster, namespace, "needs-secret"), 90) == "Complete"


def test_restricted_pod_security_is_enforced(cluster: ClusterAccess, namespace: str) -> None:
    cluster.kubectl(
        "label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted"
    )
    privileged = json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "root-pod"},
            "spec": {
                "containers": [
                    {
                        "name": "c",
                        "image": "busybox",
                        "command": ["true"],
                        # root, may escalate, keeps capabilities: baseline at best
                        "securityContext": {"runAsUser": 0},
                    }
                ]
            },
        }
    )
    refused = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=privileged, check=False)
    assert refused.returncode != 0
    assert 'violates PodSecurity "restricted:latest"' in refused.stderr
    for rule in ("allowPrivilegeEscalation != false", "runAsNonRoot != true", "seccompProfile"):
        assert rule in refused.stderr
    for rule in ("allowPrivilegeEscalation != false", "runAsNonRoot != true", "seccompProfile"):
        assert rule in refused.stderr

    restricted = {
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    container = {
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    }
    cluster.apply(
        namespace, job("compliant", "print('ok')", extra_container=container, extra_spec=restricted)
    )
    assert wait_until(lambda: job_condition(cluster, namespace, "compliant"), 90) == "Complete"


def test_deleting_the_owner_garbage_collects_the_job(
    cluster: ClusterAccess, namespace: str
) -> None:
    cluster.kubectl("create", "configmap", "owner", "-n", namespace, "--from-literal=a=b")
    uid = get_json(cluster, "configmap", "owner", "-n", namespace)["metadata"]["uid"]
    owned = json.loads(job("owned", "import time; time.sleep(600)"))
    owned["metadata"]["ownerReferences"] = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "name": "owner",
            "uid": uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    cluster.apply(namespace, json.dumps(owned))
    wait_until(
        lambda: any(
            p["status"].get("phase") == "Running" for p in pods_of(cluster, namespace, "owned")
        ),
        60,
    )
    cluster.kubectl("delete", "configmap", "owner", "-n", namespace)

    def gone() -> bool:
        jobs = cluster.kubectl("get", "jobs", "-n", namespace, "-o", "name").stdout.strip()
        pods = cluster.kubectl("get", "pods", "-n", namespace, "-o", "name").stdout.strip()
        return not jobs and not pods

    # The Job goes, then its pod: the kubelet stops the process and finalises the deletion.
    wait_until(gone, 90, what="the Job and its pod to be garbage-collected")


def test_pod_active_deadline_kills_the_process(cluster: ClusterAccess, namespace: str) -> None:
    pod = json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "sleeper"},
            "spec": {
                "restartPolicy": "Never",
                "activeDeadlineSeconds": 2,
                "containers": [
                    {
                        "name": "c",
                        "image": "python",
                        "command": ["python", "-c", "import time; time.sleep(600)"],
                    }
                ],
            },
        }
    )
    cluster.apply(namespace, pod)

    def failed() -> dict[str, Any] | None:
        p = get_json(cluster, "pod", "sleeper", "-n", namespace)
        return p if p["status"].get("phase") == "Failed" else None

    p = wait_until(failed, 60, what="the pod to pass its deadline")
    assert p["status"]["reason"] == "DeadlineExceeded"
    # SIGTERM first, as a kubelet does: 143, or 137 when it had to SIGKILL
    assert p["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] in (137, 143)


def test_node_selector_that_does_not_match_stays_pending(
    cluster: ClusterAccess, namespace: str
) -> None:
    cluster.apply(
        namespace, job("gpu-node", "print(1)", extra_spec={"nodeSelector": {"gpu": "a100"}})
    )

    def unschedulable() -> dict[str, Any] | None:
        pods = pods_of(cluster, namespace, "gpu-node")
        for c in (pods[0]["status"].get("conditions") or []) if pods else []:
            if c["type"] == "PodScheduled" and c["status"] == "False":
                return dict(c)
        return None

    cond = wait_until(unschedulable, 30, what="PodScheduled=False")
    assert cond["reason"] == "Unschedulable"
    assert "node affinity/selector" in cond["message"]
