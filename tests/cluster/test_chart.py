"""The Helm chart: it lints, renders pods that meet the `restricted` level, and its RBAC is
enough for the operator to do its work and no more (it cannot read Secrets)."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from medforge_localcluster import binaries
from tests.cluster.conftest import ROOT, Forge, OperatorProcess, base_model
from tests.cluster.test_operator import contribution, status, wait_phase
from tests.conftest import ClusterAccess
from tests.helpers import wait_until

CHART = ROOT / "helm" / "medforge"
SA = "medforge-operator"


def helm(*args: str) -> str:
    proc = subprocess.run(
        [str(binaries.ensure(["helm"], log=False)["helm"]), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def render(namespace: str, forge: Forge, *extra: str) -> list[dict[str, Any]]:
    out = helm(
        "template",
        "medforge",
        str(CHART),
        "--namespace",
        namespace,
        "--set",
        f"store.endpoint={forge.endpoint}",
        "--set",
        f"store.bucket={forge.bucket}",
        *extra,
    )
    return [d for d in yaml.safe_load_all(out) if d]


def test_chart_lints_and_refuses_a_missing_store(forge: Forge) -> None:
    helm("lint", str(CHART), "--set", "store.endpoint=https://s3.example.org")
    proc = subprocess.run(
        [str(binaries.ensure(["helm"], log=False)["helm"]), "template", str(CHART)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "store.endpoint is required" in proc.stderr


def test_namespace_scoped_install_is_confined_to_its_namespaces(forge: Forge) -> None:
    docs = render(
        "forge-system",
        forge,
        "--set",
        "watchNamespaces={hospital-a,hospital-b,forge}",
        "--set",
        "forgeNamespaces={forge}",
    )
    kinds = sorted(d["kind"] for d in docs)
    # One per watched namespace, and the leader-election Role in the release namespace.
    assert kinds.count("Role") == 4 and kinds.count("RoleBinding") == 4
    cluster_role = next(
        d for d in docs if d["kind"] == "ClusterRole" and "operator" in d["metadata"]["name"]
    )
    # Cluster-wide it may only read CRD definitions (kopf's discovery) and BaseModels, and get
    # its own namespaces by name; the rest is per namespace.
    assert cluster_role["rules"][0]["resources"] == ["customresourcedefinitions"]
    ns_rule = next(r for r in cluster_role["rules"] if r["resources"] == ["namespaces"])
    assert ns_rule == {
        "apiGroups": [""],
        "resources": ["namespaces"],
        "verbs": ["get"],
        "resourceNames": ["hospital-a", "hospital-b", "forge"],
    }
    assert not any("jobs" in r["resources"] for r in cluster_role["rules"])
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    env = {
        e["name"]: e.get("value")
        for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["MEDFORGE_NAMESPACES"] == "hospital-a,hospital-b,forge"
    assert env["MEDFORGE_FORGE_NAMESPACES"] == "forge"
    policy = next(d for d in docs if d["kind"] == "ValidatingAdmissionPolicy")
    member = next(v for v in policy["spec"]["variables"] if v["name"] == "member")
    assert member["expression"] == 'request.namespace in ["hospital-a","hospital-b","forge"]'


def can_i(cluster: ClusterAccess, ns: str, *args: str) -> bool:
    out = cluster.kubectl(
        "auth", "can-i", *args, f"--as=system:serviceaccount:{ns}:{SA}", check=False
    )
    return out.stdout.strip() == "yes"


JOB_AS_OPERATOR = """
apiVersion: batch/v1
kind: Job
metadata:
  name: {name}
  labels: {{app.kubernetes.io/managed-by: medforge-operator}}
spec:
  template:
    spec:
      restartPolicy: Never
      automountServiceAccountToken: false
      securityContext: {{runAsNonRoot: true, runAsUser: 10001, seccompProfile: {{type: RuntimeDefault}}}}
      containers:
        - name: c
          image: busybox
          securityContext: {{allowPrivilegeEscalation: false, capabilities: {{drop: [ALL]}}}}
          {mounts}
      {volumes}
"""


def job_as_operator(cluster: ClusterAccess, release_ns: str, ns: str, name: str, host: bool) -> str:
    """Create a Job as the operator's ServiceAccount (impersonated); the API's answer."""
    doc = JOB_AS_OPERATOR.format(
        name=name,
        mounts="volumeMounts: [{name: h, mountPath: /h}]" if host else "",
        volumes="volumes: [{name: h, hostPath: {path: /etc}}]" if host else "",
    )
    out = cluster.kubectl(
        "create",
        "-n",
        ns,
        "-f",
        "-",
        f"--as=system:serviceaccount:{release_ns}:{SA}",
        input=doc,
        check=False,
    )
    return out.stdout + out.stderr


def test_chart_rbac_is_enough_and_least(
    cluster: ClusterAccess,
    namespace: str,
    forge_namespace: str,
    forge: Forge,
    operator: OperatorProcess,
    tmp_path: Path,
) -> None:
    cluster.kubectl(
        "label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted"
    )
    docs = render(namespace, forge, "--set", f"forgeNamespaces={{{forge_namespace}}}")
    manifest = "\n---\n".join(yaml.safe_dump(d) for d in docs)
    dry = cluster.kubectl("apply", "-n", namespace, "--dry-run=server", "-f", "-", input=manifest)
    assert "PodSecurity" not in dry.stderr  # the operator's pod meets `restricted`
    cluster.apply(namespace, manifest)
    role = f"{SA}-{namespace}"
    try:
        assert can_i(cluster, namespace, "create", "jobs.batch", "-n", "any-hospital")
        assert can_i(
            cluster,
            namespace,
            "patch",
            "loracontributions.medforge.io",
            "--subresource=status",
            "-n",
            "x",
        )
        assert not can_i(cluster, namespace, "get", "secrets", "-n", "any-hospital")
        assert not can_i(cluster, namespace, "list", "secrets", "-n", "any-hospital")
        assert can_i(cluster, namespace, "create", "secrets", "-n", "any-hospital")
        assert not can_i(cluster, namespace, "list", "namespaces")
        assert can_i(cluster, namespace, "get", "namespaces")
        assert not can_i(cluster, namespace, "patch", "loracontributions.medforge.io", "-n", "x")
        assert not can_i(cluster, namespace, "delete", "pods", "-n", "x")

        # RBAC lets it create Jobs anywhere; the admission policy confines them to member
        # namespaces and restricted pods, whatever the operator's code does. A new policy
        # takes effect once the API server has loaded it: wait for that first.
        def denied() -> str | None:
            out = job_as_operator(cluster, namespace, "kube-system", "escape", host=False)
            if "created" in out:
                cluster.kubectl("delete", "job", "escape", "-n", "kube-system", check=False)
                return None
            return out

        out = wait_until(denied, 60, every=1, what="the admission policy to take effect")
        assert "is not a MedForge member namespace" in out, out
        out = job_as_operator(cluster, namespace, "default", "escape", host=False)
        assert "is not a MedForge member namespace" in out, out
        out = job_as_operator(cluster, namespace, namespace, "hostpath", host=True)
        assert "without host paths" in out, out
        assert "ValidatingAdmissionPolicy" in out

        # The operator runs with the chart's ServiceAccount token instead of the admin's.
        token = cluster.kubectl(
            "create", "token", SA, "-n", namespace, "--duration=1h"
        ).stdout.strip()
        cfg = yaml.safe_load(cluster.kubeconfig.read_text())
        cfg["users"] = [{"name": cfg["contexts"][0]["context"]["user"], "user": {"token": token}}]
        kubeconfig = tmp_path / "sa.kubeconfig"
        kubeconfig.write_text(yaml.safe_dump(cfg))
        operator.stop()
        scoped = OperatorProcess(
            cluster,
            forge,
            tmp_path / "sa-operator.log",
            KUBECONFIG=str(kubeconfig),
            MEDFORGE_LEASE_NAMESPACE=namespace,  # as the chart sets it
        )
        scoped.start()
        try:
            base = base_model(cluster, forge, "clip-rbac")
            doc = json.loads(contribution("rbac", base))
            doc["spec"]["sharing"] = {"forges": [f"{forge_namespace}/rbac"]}
            cluster.apply(namespace, json.dumps(doc))
            wait_phase(cluster, namespace, "rbac", "Succeeded", 90)
            comp = {
                "apiVersion": "medforge.io/v1alpha1",
                "kind": "CompositeModel",
                "metadata": {"name": "rbac"},
                "spec": {
                    "baseModel": {"name": base[0]},
                    "contributions": {
                        "selector": {"matchLabels": {"medforge.io/test": "yes"}},
                        "namespaceSelector": {
                            "matchLabels": {"kubernetes.io/metadata.name": namespace}
                        },
                    },
                },
            }
            cluster.apply(forge_namespace, json.dumps(comp))
            wait_until(
                lambda: (
                    (status(cluster, "cmodel", forge_namespace, "rbac").get("current") or {}).get(
                        "revision"
                    )
                    == 1
                ),
                90,
                what="revision 1 with the chart's RBAC",
            )
            log = scoped.log.read_text()
            assert "Forbidden" not in log and " 403" not in log, scoped.tail()
        finally:
            scoped.stop(signal.SIGTERM)
            operator.start()
    finally:
        cluster.kubectl(
            "delete",
            "clusterrolebinding,clusterrole,validatingadmissionpolicy,"
            "validatingadmissionpolicybinding",
            role,
            check=False,
        )


@pytest.fixture(autouse=True)
def _helm_built() -> None:
    binaries.ensure(["helm"], log=False)
