"""The Helm chart: it lints, renders pods that meet the `restricted` level, and its RBAC is
enough for the operator to do its work and no more (it cannot read Secrets)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from medforge_localcluster import binaries
from medforge_operator import jobs
from tests.builders import contribution
from tests.cluster.conftest import ROOT, Forge, OperatorProcess, base_model
from tests.cluster.test_operator import status, wait_phase
from tests.conftest import ClusterAccess
from tests.helpers import get_json, wait_until

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


def operator_job(name: str) -> dict[str, Any]:
    """A Job of the shape the operator's builder makes (restricted, no token, only its own
    volumes), from the builder itself."""
    owner = {
        "apiVersion": "medforge.io/v1alpha1",
        "kind": "LoRAContribution",
        "metadata": {"name": name, "uid": "0000"},
    }
    job = jobs.job_manifest(
        name=name,
        namespace="x",
        owner=owner,
        component="train",
        image="busybox",
        command=["true"],
        annotations={},
        env=[],
        labels={},
        resources={},
        volumes=[{"name": "data", "persistentVolumeClaim": {"claimName": "d", "readOnly": True}}],
        volume_mounts=[],
        backoff_limit=0,
        active_deadline=None,
        ttl_seconds=60,
    )
    del job["metadata"]["namespace"], job["metadata"]["ownerReferences"]
    return job


def _pod(doc: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = doc["spec"]["template"]["spec"]
    return pod


def _container(doc: dict[str, Any]) -> dict[str, Any]:
    c: dict[str, Any] = _pod(doc)["containers"][0]
    return c


# One violation of the restricted shape per field, with the policy message it must meet.
VIOLATIONS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "hostpath": (
        lambda d: _pod(d)["volumes"].append({"name": "h", "hostPath": {"path": "/etc"}}),
        "no host paths",
    ),
    "nfs": (
        lambda d: _pod(d)["volumes"].append(
            {"name": "n", "nfs": {"server": "127.0.0.1", "path": "/"}}
        ),
        "no host paths, nfs",
    ),
    "projected-token": (
        lambda d: _pod(d)["volumes"].append(
            {"name": "t", "projected": {"sources": [{"serviceAccountToken": {"path": "t"}}]}}
        ),
        "projected ServiceAccount tokens",
    ),
    "service-account": (
        lambda d: _pod(d).update(serviceAccountName="medforge-operator"),
        "default ServiceAccount",
    ),
    "token": (
        lambda d: _pod(d).update(automountServiceAccountToken=True),
        "no token mounted",
    ),
    "host-port": (
        lambda d: _container(d).update(ports=[{"containerPort": 80, "hostPort": 80}]),
        "no host ports",
    ),
    "host-network": (lambda d: _pod(d).update(hostNetwork=True), "no host namespaces"),
    "pod-seccomp": (
        lambda d: _pod(d)["securityContext"].update(seccompProfile={"type": "Unconfined"}),
        "seccompProfile RuntimeDefault",
    ),
    "container-seccomp": (
        lambda d: _container(d)["securityContext"].pop("seccompProfile"),
        "seccompProfile RuntimeDefault",
    ),
    "root": (
        lambda d: _container(d)["securityContext"].update(runAsUser=0),
        "run as non-root",
    ),
    "escalation": (
        lambda d: _container(d)["securityContext"].update(allowPrivilegeEscalation=True),
        "never escalate privileges",
    ),
    "capabilities": (
        lambda d: _container(d)["securityContext"]["capabilities"].update(add=["NET_RAW"]),
        "add none",
    ),
    "init": (
        lambda d: _pod(d).update(initContainers=[dict(_container(d), name="init")]),
        "no init or ephemeral containers",
    ),
}


def job_as_operator(
    cluster: ClusterAccess,
    release_ns: str,
    ns: str,
    name: str,
    violation: str | None = None,
    dry_run: bool = False,
) -> str:
    """Create a Job of the operator's shape (with one violation, if named) as the operator's
    ServiceAccount (impersonated); the API's answer."""
    doc = operator_job(name)
    if violation:
        VIOLATIONS[violation][0](doc)
    out = cluster.kubectl(
        "create",
        "-n",
        ns,
        "-f",
        "-",
        f"--as=system:serviceaccount:{release_ns}:{SA}",
        *(["--dry-run=server"] if dry_run else []),
        input=json.dumps(doc),
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
            out = job_as_operator(cluster, namespace, "kube-system", "escape")
            if "created" in out:
                cluster.kubectl("delete", "job", "escape", "-n", "kube-system", check=False)
                return None
            return out

        out = wait_until(denied, 60, every=1, what="the admission policy to take effect")
        assert "is not a MedForge member namespace" in out, out
        out = job_as_operator(cluster, namespace, "default", "escape")
        assert "is not a MedForge member namespace" in out, out
        # The shape the operator's builder makes passes; each field's violation is refused.
        for violation, (_, message) in VIOLATIONS.items():
            out = job_as_operator(cluster, namespace, namespace, violation, violation, True)
            assert message in out, (violation, out)
            assert "ValidatingAdmissionPolicy" in out, (violation, out)
        out = job_as_operator(cluster, namespace, namespace, "shape", dry_run=True)
        assert "created" in out, out

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


def helm_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(binaries.ensure(["helm"], log=False)["helm"]), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("store.endpont=https://s3.example.org", "endpont"),  # a typo
        ("replicas=two", "/replicas"),
        ("monitoring.alerts.stalledFor=fifteen", "stalledFor"),
        ("serviceAccount.annotations.role=", None),  # an empty annotation value is fine
        ("memberLabel.key=Not A Label", "/memberLabel/key"),
        ("store.endpoint=s3.example.org", "/store/endpoint"),  # no scheme
    ],
)
def test_values_schema_refuses_bad_values_and_names_them(setting: str, named: str | None) -> None:
    proc = helm_run(
        "template",
        "medforge",
        str(CHART),
        "--set",
        "store.endpoint=https://s3.example.org",
        "--set",
        setting,
    )
    if named is None:
        assert proc.returncode == 0, proc.stderr
    else:
        assert proc.returncode != 0 and named in proc.stderr, proc.stderr


def test_rendered_chart_is_valid_kubernetes_and_takes_the_platform_settings(forge: Forge) -> None:
    import kubernetes_validate

    docs = render(
        "forge-system",
        forge,
        "--set",
        "fullnameOverride=forge-op",
        "--set",
        "imagePullSecrets[0].name=regcred",
        "--set",
        "serviceAccount.annotations.eks\\.amazonaws\\.com/role-arn=arn:aws:iam::1:role/m",
        "--set",
        "podAnnotations.team=platform",
        "--set",
        "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
        ".nodeSelectorTerms[0].matchExpressions[0].key=pool",
        "--set",
        "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
        ".nodeSelectorTerms[0].matchExpressions[0].operator=Exists",
        "--set",
        "store.credentialsSecret=",
        "--set",
        "monitoring.serviceMonitor.enabled=true",
        "--set",
        "monitoring.podMonitor.enabled=true",
        "--set",
        "monitoring.prometheusRule.enabled=true",
        "--set",
        "evaluationNetworkPolicy.enabled=true",
        "--set",
        "evaluationNetworkPolicy.namespaces={hospital-a,hospital-b}",
        "--set",
        "evaluationNetworkPolicy.storeCIDRs={10.0.0.5/32}",
        "--set",
        "evaluationNetworkPolicy.datasetCIDRs={192.168.1.0/24}",
    )
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert sorted(p["metadata"]["namespace"] for p in policies) == ["hospital-a", "hospital-b"]
    egress = policies[0]["spec"]["egress"]
    assert [b["ipBlock"]["cidr"] for b in egress[0]["to"]] == ["10.0.0.5/32", "192.168.1.0/24"]
    assert policies[0]["spec"]["ingress"] == []
    assert policies[0]["spec"]["podSelector"]["matchLabels"]["medforge.io/component"] == "evaluate"
    assert not [d for d in render("forge-system", forge) if d["kind"] == "NetworkPolicy"]
    monitoring_kinds = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    for d in docs:
        if d["kind"] not in monitoring_kinds:  # no public schema for the Prometheus Operator's
            kubernetes_validate.validate(d, "1.35", strict=True)
    by_kind = {d["kind"]: d for d in docs}
    assert monitoring_kinds <= set(by_kind)
    deploy = by_kind["Deployment"]
    pod = deploy["spec"]["template"]
    assert deploy["metadata"]["name"] == "forge-op"
    assert pod["spec"]["serviceAccountName"] == "forge-op"
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["metadata"]["annotations"] == {"team": "platform"}
    assert "nodeAffinity" in pod["spec"]["affinity"]
    env = {e["name"] for e in pod["spec"]["containers"][0]["env"]}
    # No static keys: the pod's identity (IRSA) through boto3's default chain.
    assert "MEDFORGE_STORE_ACCESS_KEY_ID" not in env
    sa = by_kind["ServiceAccount"]
    assert sa["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/m"}
    # The monitors find the operator's metrics port.
    service = by_kind["Service"]
    assert by_kind["ServiceMonitor"]["spec"]["selector"]["matchLabels"].items() <= (
        service["metadata"]["labels"].items()
    )
    assert by_kind["ServiceMonitor"]["spec"]["endpoints"][0]["port"] == "metrics"
    ports = {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
    assert by_kind["PodMonitor"]["spec"]["podMetricsEndpoints"][0]["port"] in ports
    board = next(
        d for d in docs if d["kind"] == "ConfigMap" and "dashboard" in d["metadata"]["name"]
    )
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(board["data"]["medforge.json"])["uid"] == "medforge-overview"
    crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    assert len(crds) == len(list((ROOT / "crds").glob("*.yaml"))) == 6
    assert all(c["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep" for c in crds)
    no_crds = render("forge-system", forge, "--set", "crds.enabled=false")
    assert not any(d["kind"] == "CustomResourceDefinition" for d in no_crds)


CRD_NAMES = [
    f"{p}.medforge.io"
    for p in (
        "basemodels",
        "compositemodels",
        "evaluationsets",
        "institutions",
        "loracontributions",
        "privacybudgets",
    )
]


def test_helm_install_then_upgrade_updates_the_crds_and_the_operator_works_after_each(
    cluster: ClusterAccess,
    namespace: str,
    forge_namespace: str,
    forge: Forge,
    operator: OperatorProcess,
    tmp_path: Path,
) -> None:
    kube = f"--kubeconfig={cluster.kubeconfig}"
    common = [
        "-n",
        namespace,
        kube,
        "--set",
        f"store.endpoint={forge.endpoint}",
        "--set",
        f"store.bucket={forge.bucket}",
        "--set",
        f"forgeNamespaces={{{forge_namespace}}}",
        # The tests' operator process reconciles; the chart's pods would be a second one.
        "--set",
        "replicas=0",
        # Cluster-wide and fixed-name: other tests of this session may hold them already.
        "--set",
        "tenantRoles.enabled=false",
    ]
    # The CRDs were applied with kubectl before: the release adopts them, as a platform team
    # moving to the chart's CRDs does.
    for crd in CRD_NAMES:
        cluster.kubectl("label", "crd", crd, "app.kubernetes.io/managed-by=Helm", "--overwrite")
        cluster.kubectl(
            "annotate",
            "crd",
            crd,
            "meta.helm.sh/release-name=medforge",
            f"meta.helm.sh/release-namespace={namespace}",
            "--overwrite",
        )
    base = base_model(cluster, forge, "clip-helm")
    try:
        out = helm_run("install", "medforge", str(CHART), *common)
        assert out.returncode == 0, out.stderr
        assert "NOTES:" in out.stdout and "forgeNamespaces" not in out.stdout
        assert forge_namespace in out.stdout  # NOTES say where composites go
        crd = get_json(cluster, "crd", "loracontributions.medforge.io")
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        cluster.apply(namespace, contribution("after-install", base))
        wait_phase(cluster, namespace, "after-install", "Succeeded", 90)

        # A new chart version whose CRD gained a printer column: upgrade applies it.
        changed = tmp_path / "medforge"
        shutil.copytree(CHART, changed, symlinks=False)
        path = changed / "files" / "crds" / "loracontributions.medforge.io.yaml"
        doc = yaml.safe_load(path.read_text())
        doc["spec"]["versions"][0]["additionalPrinterColumns"].append(
            {"name": "Upgraded", "type": "string", "jsonPath": ".spec.task.name"}
        )
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        out = helm_run("upgrade", "medforge", str(changed), *common)
        assert out.returncode == 0, out.stderr
        crd = get_json(cluster, "crd", "loracontributions.medforge.io")
        columns = [c["name"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]]
        assert "Upgraded" in columns
        cluster.apply(namespace, contribution("after-upgrade", base))
        wait_phase(cluster, namespace, "after-upgrade", "Succeeded", 90)
        shown = cluster.kubectl("get", "lorac", "after-upgrade", "-n", namespace).stdout
        assert "UPGRADED" in shown and "breakhis" in shown

        out = helm_run("uninstall", "medforge", "-n", namespace, kube)
        assert out.returncode == 0, out.stderr
        # Kept: the CRDs, and with them every contribution.
        assert get_json(cluster, "lorac", "after-install", "-n", namespace)["status"]["phase"] == (
            "Succeeded"
        )
    finally:
        helm_run("uninstall", "medforge", "-n", namespace, kube)
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
