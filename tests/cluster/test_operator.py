"""The operator against the local cluster: real kubectl, real Jobs through the process kubelet,
a real S3 store, stand-in trainer and merger programs that honour the job contract."""

from __future__ import annotations

import base64
import json
import signal
import time
from typing import Any

import pytest

from tests.builders import contribution
from tests.cluster.conftest import Forge, OperatorProcess, base_model
from tests.conftest import ClusterAccess
from tests.helpers import get_json, wait_until

pytestmark = pytest.mark.usefixtures("operator")


def status(cluster: ClusterAccess, kind: str, ns: str, name: str) -> dict[str, Any]:
    st: dict[str, Any] = get_json(cluster, kind, name, "-n", ns).get("status") or {}
    return st


def condition(st: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next((c for c in st.get("conditions") or [] if c["type"] == ctype), {})


def wait_phase(
    cluster: ClusterAccess,
    ns: str,
    name: str,
    phase: str,
    timeout: float = 90,
    op: OperatorProcess | None = None,
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        st = status(cluster, "lorac", ns, name)
        return st if st.get("phase") == phase else None

    return wait_until(check, timeout, what=f"{ns}/{name} phase {phase}")


@pytest.fixture(scope="module")
def base(cluster: ClusterAccess, forge: Forge, operator: OperatorProcess) -> tuple[str, str]:
    return base_model(cluster, forge, "clip-tiny")


def test_contribution_trains_verifies_and_reports(
    cluster: ClusterAccess, namespace: str, base: tuple[str, str]
) -> None:
    out = cluster.apply(namespace, contribution("breakhis", base))
    assert "loracontribution.medforge.io/breakhis created" in out.stdout
    st = wait_phase(cluster, namespace, "breakhis", "Succeeded")
    assert st["observedGeneration"] == 1
    for ctype in ("Ready", "Trained", "ArtifactVerified"):
        assert condition(st, ctype)["status"] == "True", st
    assert condition(st, "Reconciling")["status"] == "False"
    assert condition(st, "Stalled")["status"] == "False"
    assert st["job"]["name"] == "breakhis-train-g1" and st["job"]["attempts"] == 1
    art = st["artifact"]
    uid = get_json(cluster, "lorac", "breakhis", "-n", namespace)["metadata"]["uid"]
    # The operator's own verified copy, per object and digest (no PUT URL ever reaches it).
    assert art["uri"].endswith(
        f"/verified/contributions/{namespace}/breakhis/{uid}/{art['digest'][7:]}/"
    )
    assert art["digest"].startswith("sha256:") and art["baseModelDigest"] == base[1]
    assert st["metrics"]["accuracy"] == pytest.approx(0.81)

    table = cluster.kubectl("get", "lorac", "-n", namespace).stdout
    assert table.split("\n")[0].split()[:4] == ["NAME", "PHASE", "READY", "TASK"]
    assert "Succeeded" in table and "True" in table and "0.81" in table
    assert "breakhis" in cluster.kubectl("get", "medforge", "-n", namespace).stdout

    job = get_json(cluster, "job", "breakhis-train-g1", "-n", namespace)
    owner = job["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "LoRAContribution" and owner["controller"] is True
    pod = job["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    c = pod["containers"][0]
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    # Annotations are for people: no plan, no lifetime the operator would read back.
    assert not any("plan" in k or "lifetime" in k for k in job["metadata"]["annotations"])
    # No URL in the Job: its config lives in a Secret the Job owns, mounted as a file.
    assert "X-Amz" not in json.dumps(job) and "MEDFORGE_JOB_CONFIG_FILE" in json.dumps(c["env"])
    assert "AWS_SECRET_ACCESS_KEY" not in json.dumps(c["env"])  # no store credentials in the Job
    secret = get_json(cluster, "secret", "breakhis-train-g1-config", "-n", namespace)
    assert secret["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    cfg = json.loads(base64.b64decode(secret["data"]["config.json"]))
    assert all("X-Amz-Signature" in u for u in cfg["output"]["files"].values())
    assert st["baseModel"] == {"name": base[0], "digest": base[1]}

    events = cluster.kubectl(
        "get", "events", "-n", namespace, "--field-selector", "involvedObject.kind=LoRAContribution"
    ).stdout
    assert "JobCreated" in events and "Verified" in events
    # kopf keeps nothing in annotations on the user's object.
    obj = get_json(cluster, "lorac", "breakhis", "-n", namespace)
    assert not any("kopf" in k for k in (obj["metadata"].get("annotations") or {}))


def test_spec_change_starts_a_new_job_and_retires_the_old(
    cluster: ClusterAccess, namespace: str, base: tuple[str, str]
) -> None:
    cluster.apply(namespace, contribution("lung", base))
    wait_phase(cluster, namespace, "lung", "Succeeded")
    cluster.kubectl(
        "patch",
        "lorac",
        "lung",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec": {"training": {"epochs": 5}}}',
    )

    def regenerated() -> dict[str, Any] | None:
        st = status(cluster, "lorac", namespace, "lung")
        return st if st.get("observedGeneration") == 2 and st.get("phase") == "Succeeded" else None

    st = wait_until(regenerated, 90, what="generation 2 trained")
    assert st["job"]["name"] == "lung-train-g2"
    assert "/lung/" in st["artifact"]["uri"] and st["artifact"]["uri"].endswith(
        f"/{st['artifact']['digest'][7:]}/"
    )
    wait_until(
        lambda: (
            cluster.kubectl("get", "jobs", "-n", namespace, "-o", "name").stdout.split()
            == ["job.batch/lung-train-g2"]
        ),
        60,
        what="the generation-1 Job to be retired",
    )


def test_queued_contribution_waits_suspended_until_admitted(
    cluster: ClusterAccess, namespace: str, base: tuple[str, str]
) -> None:
    """With a Kueue queue the Job is created suspended and nothing runs; admission (Kueue
    unsuspends the Job, done here by hand) lets it train to the end."""
    cluster.apply(namespace, contribution("colon", base, resources={"queueName": "gpu-queue"}))

    def created() -> dict[str, Any] | None:
        st = status(cluster, "lorac", namespace, "colon")
        return st if condition(st, "Ready").get("reason") == "JobCreated" else None

    wait_until(created, 60, what="the queued Job")
    job = get_json(cluster, "job", "colon-train-g1", "-n", namespace)
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    time.sleep(3)  # queued: no pod, and the status stays as it was
    assert cluster.kubectl("get", "pods", "-n", namespace, "-o", "name").stdout.strip() == ""
    st = status(cluster, "lorac", namespace, "colon")
    assert condition(st, "Ready")["reason"] == "JobCreated" and st["phase"] == "Pending", st
    cluster.kubectl(
        "patch", "job", "colon-train-g1", "-n", namespace, "-p", '{"spec": {"suspend": false}}'
    )
    st = wait_phase(cluster, namespace, "colon", "Succeeded")
    assert st["job"]["attempts"] == 1


def test_missing_secret_is_reported_then_recovers(
    cluster: ClusterAccess, namespace: str, base: tuple[str, str]
) -> None:
    doc = contribution(
        "colon",
        base,
        dataset={
            "uri": "s3://hospital-data/colon/",
            "credentialsSecretRef": {"name": "data-creds"},
        },
    )
    cluster.apply(namespace, doc)

    def stalled() -> dict[str, Any] | None:
        st = status(cluster, "lorac", namespace, "colon")
        return (
            st if condition(st, "Stalled").get("reason") == "CreateContainerConfigError" else None
        )

    st = wait_until(stalled, 60, what="CreateContainerConfigError on the status")
    assert st["phase"] == "Pending"
    assert 'secret "data-creds" not found' in condition(st, "Stalled")["message"]
    assert condition(st, "Ready")["status"] == "False"

    cluster.kubectl(
        "create",
        "secret",
        "generic",
        "data-creds",
        "-n",
        namespace,
        "--from-literal=AWS_ACCESS_KEY_ID=a",
        "--from-literal=AWS_SECRET_ACCESS_KEY=b",
    )
    st = wait_phase(cluster, namespace, "colon", "Succeeded", 120)
    assert condition(st, "Stalled")["status"] == "False"


def test_job_failing_backoff_limit_times(
    cluster: ClusterAccess, namespace: str, base: tuple[str, str]
) -> None:
    cluster.apply(namespace, contribution("broken", base, task="fail-data", backoffLimit=1))
    st = wait_phase(cluster, namespace, "broken", "Failed", 120)
    stalled = condition(st, "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "BackoffLimitExceeded"
    assert "no class folders" in stalled["message"] and "2 attempt(s)" in stalled["message"]
    assert st["job"]["attempts"] == 2


def test_digest_mismatch_is_never_ready(
    cluster: ClusterAccess, namespace: str, base: tuple[str, str]
) -> None:
    cluster.apply(namespace, contribution("tampered", base, task="corrupt-upload"))
    st = wait_phase(cluster, namespace, "tampered", "Failed")
    verified = condition(st, "ArtifactVerified")
    assert verified["status"] == "False" and verified["reason"] == "DigestMismatch"
    assert "adapter.safetensors" in verified["message"]
    assert condition(st, "Ready")["status"] == "False" and "artifact" not in st


def test_missing_base_model_is_reported_then_recovers(
    cluster: ClusterAccess, namespace: str, forge: Forge, base: tuple[str, str]
) -> None:
    cluster.apply(namespace, contribution("nobase", ("clip-later", "")))

    def reported() -> dict[str, Any] | None:
        st = status(cluster, "lorac", namespace, "nobase")
        return st if condition(st, "Stalled").get("status") == "True" else None

    st = wait_until(reported, 60, what="a stalled status")
    assert condition(st, "Stalled")["reason"] == "BaseModelNotFound"
    assert "no BaseModel 'clip-later'" in condition(st, "Stalled")["message"]
    assert st["phase"] == "Pending"
    base_model(cluster, forge, "clip-later")
    wait_phase(cluster, namespace, "nobase", "Succeeded", 90)


def test_bad_specs_are_refused_by_the_api_server(
    cluster: ClusterAccess, namespace: str, base: tuple[str, str]
) -> None:
    bad = contribution("bad", base, lora={"rank": 0})
    out = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=bad, check=False)
    assert out.returncode != 0 and "spec.lora.rank" in out.stderr
    bad = contribution(
        "bad", base, dataset={"uri": "pvc://claim/x", "credentialsSecretRef": {"name": "s"}}
    )
    out = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=bad, check=False)
    assert "credentialsSecretRef applies to s3:// datasets only" in out.stderr
    comp = {
        "apiVersion": "medforge.io/v1alpha1",
        "kind": "CompositeModel",
        "metadata": {"name": "c"},
        "spec": {
            "baseModel": {"name": base[0]},
            "contributions": {"selector": {"matchLabels": {"a": "b"}}},
            "strategy": {"type": "svd"},
        },
    }
    out = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(comp), check=False)
    assert "spec.strategy.rank is required" in out.stderr
    # An empty selector would take every shared contribution: refused.
    comp["spec"] = {"baseModel": {"name": base[0]}, "contributions": {"selector": {}}}
    out = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(comp), check=False)
    assert out.returncode != 0 and "empty selector" in out.stderr
    # Store URIs are no longer part of any spec: the API server drops them, the name is required.
    bad = json.loads(contribution("bad", base))
    bad["spec"]["baseModel"] = {"uri": "s3://forge/contributions/other/x/1/"}
    out = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(bad), check=False)
    assert out.returncode != 0 and "spec.baseModel" in out.stderr


def test_operator_restart_leaves_no_duplicate_job(
    cluster: ClusterAccess, namespace: str, base: tuple[str, str], operator: OperatorProcess
) -> None:
    docs = "\n---\n".join(contribution(f"site-{i}", base) for i in range(8))
    cluster.apply(namespace, docs)
    time.sleep(0.7)  # mid-reconcile: some Jobs exist, some not yet
    operator.stop(signal.SIGKILL)
    operator.start()
    for i in range(8):
        wait_phase(cluster, namespace, f"site-{i}", "Succeeded", 120)
    jobs = get_json(cluster, "jobs", "-n", namespace)["items"]
    assert sorted(j["metadata"]["name"] for j in jobs) == [f"site-{i}-train-g1" for i in range(8)]
    for i in range(8):
        assert status(cluster, "lorac", namespace, f"site-{i}")["job"]["attempts"] == 1


def test_a_name_longer_than_a_label_value_trains(
    cluster: ClusterAccess, namespace: str, base: tuple[str, str]
) -> None:
    """Object names may have 253 characters, label values 63: the Job must still be made."""
    name = "st-marys-hospital-radiology-department." + "breakhis-" * 9 + "v1"
    assert len(name) > 100
    cluster.apply(namespace, contribution(name, base))
    st = wait_phase(cluster, namespace, name, "Succeeded", 90)
    job = get_json(cluster, "job", st["job"]["name"], "-n", namespace)
    assert all(len(v) <= 63 for v in job["metadata"]["labels"].values())
    assert job["metadata"]["annotations"]["medforge.io/owner-name"] == name
