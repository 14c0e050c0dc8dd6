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
from tests.cluster.conftest import ROOT, Forge, OperatorProcess
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
    docs = render("forge-system", forge, "--set", "watchNamespaces={hospital-a,hospital-b}")
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("Role") == 2 and kinds.count("RoleBinding") == 2
    (cluster_role,) = [d for d in docs if d["kind"] == "ClusterRole"]
    # Cluster-wide it may only read CRD definitions (kopf's discovery); the rest is per namespace.
    assert cluster_role["rules"] == [
        {
            "apiGroups": ["apiextensions.k8s.io"],
            "resources": ["customresourcedefinitions"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    env = {
        e["name"]: e.get("value")
        for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["MEDFORGE_NAMESPACES"] == "hospital-a,hospital-b"


def can_i(cluster: ClusterAccess, ns: str, *args: str) -> bool:
    out = cluster.kubectl(
        "auth", "can-i", *args, f"--as=system:serviceaccount:{ns}:{SA}", check=False
    )
    return out.stdout.strip() == "yes"


def test_chart_rbac_is_enough_and_least(
    cluster: ClusterAccess, namespace: str, forge: Forge, operator: OperatorProcess, tmp_path: Path
) -> None:
    cluster.kubectl(
        "label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted"
    )
    docs = render(namespace, forge)
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
        assert not can_i(cluster, namespace, "patch", "loracontributions.medforge.io", "-n", "x")
        assert not can_i(cluster, namespace, "delete", "pods", "-n", "x")

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
            cluster, forge, tmp_path / "sa-operator.log", KUBECONFIG=str(kubeconfig)
        )
        scoped.start()
        try:
            base = forge.upload_base_model("clip-rbac")
            cluster.apply(namespace, contribution("rbac", base))
            wait_phase(cluster, namespace, "rbac", "Succeeded", 90)
            comp = {
                "apiVersion": "medforge.io/v1alpha1",
                "kind": "CompositeModel",
                "metadata": {"name": "rbac"},
                "spec": {
                    "baseModel": {"uri": base[0], "digest": base[1]},
                    "contributions": {
                        "selector": {"matchLabels": {"medforge.io/test": "yes"}},
                        "namespaceSelector": {
                            "matchLabels": {"kubernetes.io/metadata.name": namespace}
                        },
                    },
                },
            }
            cluster.apply(namespace, json.dumps(comp))
            wait_until(
                lambda: (
                    (status(cluster, "cmodel", namespace, "rbac").get("current") or {}).get(
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
        cluster.kubectl("delete", "clusterrolebinding,clusterrole", role, check=False)


@pytest.fixture(autouse=True)
def _helm_built() -> None:
    binaries.ensure(["helm"], log=False)
