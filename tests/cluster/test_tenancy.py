"""Tenancy, tried as the tenants would: hospitals act through their own ServiceAccounts (real
kubectl, impersonated) with only the chart's tenant roles, and must never obtain a URL or a byte
of another hospital's artifacts; composites take only contributions that consented; viewers see
no URL; Jobs are created only in member namespaces, and a Job queued past its URLs' lifetime
still succeeds."""

from __future__ import annotations

import base64
import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.builders import composite_manifest, contribution
from tests.cluster.conftest import ROOT, Forge, OperatorProcess, base_model
from tests.cluster.test_chart import render
from tests.cluster.test_operator import condition, status, wait_phase
from tests.conftest import ClusterAccess
from tests.helpers import get_json, wait_until

pytestmark = pytest.mark.usefixtures("operator")
URL = re.compile(r"https?://[^\s\"']+")


@pytest.fixture(scope="module")
def tenant_roles(cluster: ClusterAccess, forge: Forge) -> None:
    """The chart's tenant ClusterRoles (medforge-contributor, -viewer, -forge-editor,
    -data-protection, -trust-reader)."""
    roles = [
        d
        for d in render("medforge-system", forge)
        if d["kind"] == "ClusterRole"
        and d["metadata"]["name"].startswith("medforge-")
        and not d["metadata"]["name"].startswith("medforge-operator")
    ]
    assert {r["metadata"]["name"] for r in roles} == {
        "medforge-contributor",
        "medforge-viewer",
        "medforge-forge-editor",
        "medforge-data-protection",
        "medforge-trust-reader",
    }
    cluster.kubectl("apply", "-f", "-", input="\n---\n".join(yaml.safe_dump(r) for r in roles))


@pytest.fixture
def hospitals(cluster: ClusterAccess, tenant_roles: None) -> Iterator[list[str]]:
    """Two member namespaces, each with a contributor (ServiceAccount `engineer`, bound to
    medforge-contributor) and a viewer (ServiceAccount `auditor`, bound to the built-in view)."""
    tag = uuid.uuid4().hex[:6]
    spaces = [f"hospital-{tag}-a", f"hospital-{tag}-b"]
    for ns in spaces:
        cluster.kubectl("create", "namespace", ns)
        cluster.kubectl("label", "namespace", ns, "medforge.io/member=true", f"tenant={tag}")
        for sa, role in (("engineer", "medforge-contributor"), ("auditor", "view")):
            bind(cluster, ns, sa, role)
    yield spaces
    for ns in spaces:
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def bind(cluster: ClusterAccess, ns: str, sa: str, role: str) -> None:
    """A ServiceAccount in `ns` bound there to a ClusterRole (as a platform team binds people)."""
    cluster.kubectl("create", "serviceaccount", sa, "-n", ns)
    cluster.kubectl(
        "create",
        "rolebinding",
        sa,
        "-n",
        ns,
        f"--clusterrole={role}",
        f"--serviceaccount={ns}:{sa}",
    )


def as_(ns: str, sa: str) -> str:
    return f"--as=system:serviceaccount:{ns}:{sa}"


def config_of(cluster: ClusterAccess, ns: str, job: str) -> dict[str, Any]:
    """A Job's config, read (as the cluster admin) from the Secret the Job owns."""
    secret = get_json(cluster, "secret", f"{job}-config", "-n", ns)
    cfg: dict[str, Any] = json.loads(base64.b64decode(secret["data"]["config.json"]))
    return cfg


def url_paths(cfg: dict[str, Any]) -> list[str]:
    """The bucket/key path of every URL in a config."""
    return [
        u.split("://", 1)[1].split("/", 1)[1].split("?")[0] for u in URL.findall(json.dumps(cfg))
    ]


def composite(name: str, base: tuple[str, str], tag: str, **spec: Any) -> str:
    return composite_manifest(name, base, {"medforge.io/test": "yes"}, {"tenant": tag}, **spec)


@pytest.fixture(scope="module")
def base(cluster: ClusterAccess, forge: Forge, operator: OperatorProcess) -> tuple[str, str]:
    return base_model(cluster, forge, "clip-tenancy")


def test_a_hospital_reaches_only_its_own(
    cluster: ClusterAccess, hospitals: list[str], forge: Forge, base: tuple[str, str]
) -> None:
    a, b = hospitals
    engineer = as_(a, "engineer")
    cluster.apply(b, contribution("lung", base))
    wait_phase(cluster, b, "lung", "Succeeded")
    b_prefix = f"contributions/{b}/lung/"

    # No spec field names the forge store: the old URI field is refused, whatever it points at.
    for target in (f"s3://{forge.bucket}/{b_prefix}", f"s3://{forge.bucket}/"):
        doc = json.loads(contribution("steal", base))
        doc["spec"]["baseModel"] = {"uri": target, "name": base[0]}
        out = cluster.kubectl(
            "apply", "-n", a, "-f", "-", engineer, input=json.dumps(doc), check=False
        )
        assert out.returncode != 0 and "uri" in out.stderr, out.stdout
    # A dataset in the forge bucket is read with the hospital's own credentials only: the
    # operator signs nothing for it.
    doc = json.loads(contribution("sneaky", base))
    doc["spec"]["dataset"] = {"uri": f"s3://{forge.bucket}/{b_prefix}"}
    cluster.kubectl("apply", "-n", a, "-f", "-", engineer, input=json.dumps(doc))
    wait_phase(cluster, a, "sneaky", "Succeeded")
    paths = url_paths(config_of(cluster, a, "sneaky-train-g1"))
    assert paths and all(
        p.startswith(
            (f"{forge.bucket}/base-models/{base[0]}/", f"{forge.bucket}/contributions/{a}/")
        )
        for p in paths
    ), paths

    # The tenant's rights: its own contributions, never their status, never Secrets, nothing of
    # the other hospital, no BaseModel or CompositeModel of its own making.
    def can(*args: str) -> bool:
        out = cluster.kubectl("auth", "can-i", *args, engineer, check=False)
        return out.stdout.strip() == "yes"

    assert can("create", "loracontributions.medforge.io", "-n", a)
    assert not can("patch", "loracontributions.medforge.io", "--subresource=status", "-n", a)
    assert not can("get", "secrets", "-n", a)
    assert not can("get", "loracontributions.medforge.io", "-n", b)
    assert not can("create", "compositemodels.medforge.io", "-n", a)
    assert not can("create", "basemodels.medforge.io")
    out = cluster.kubectl("get", "secret", "lung-train-g1-config", "-n", b, engineer, check=False)
    assert out.returncode != 0 and "forbidden" in out.stderr
    out = cluster.kubectl(
        "patch",
        "lorac",
        "sneaky",
        "-n",
        a,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": {"artifact": {"uri": f"s3://{forge.bucket}/{b_prefix}1/"}}}),
        engineer,
        check=False,
    )
    assert out.returncode != 0 and "forbidden" in out.stderr


def test_a_composite_takes_only_contributions_that_consented(
    cluster: ClusterAccess,
    hospitals: list[str],
    forge_namespace: str,
    base: tuple[str, str],
) -> None:
    a, b = hospitals
    tag = a.split("-")[1]
    me = f"{forge_namespace}/pool"
    shared = json.loads(contribution("breakhis", base))
    shared["spec"]["sharing"] = {"forges": [me]}
    cluster.kubectl("apply", "-n", a, "-f", "-", as_(a, "engineer"), input=json.dumps(shared))
    cluster.apply(b, contribution("colon", base, task="colon"))  # shared with no one
    wait_phase(cluster, a, "breakhis", "Succeeded")
    wait_phase(cluster, b, "colon", "Succeeded")
    cluster.apply(forge_namespace, composite("pool", base, tag))

    def revision(n: int) -> dict[str, Any] | None:
        st = status(cluster, "cmodel", forge_namespace, "pool")
        return st if (st.get("current") or {}).get("revision") == n else None

    st = wait_until(lambda: revision(1), 90, what="revision 1")
    assert [(i["namespace"], i["state"], i["reason"]) for i in st["inputs"]] == [
        (a, "Included", "Merged")
    ]
    paths = url_paths(config_of(cluster, forge_namespace, "pool-merge-r1"))
    assert any(f"/verified/contributions/{a}/" in p for p in paths)
    assert not any(f"/contributions/{b}/" in p for p in paths), paths
    assert status(cluster, "lorac", a, "breakhis")["usedBy"] == [{"composite": me, "revision": 1}]
    assert "usedBy" not in status(cluster, "lorac", b, "colon")

    # Hospital B opts in: the next revision takes it.
    cluster.kubectl(
        "patch",
        "lorac",
        "colon",
        "-n",
        b,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"sharing": {"forges": [me]}}}),
        as_(b, "engineer"),
    )
    st = wait_until(lambda: revision(2), 120, what="revision 2 with the consenting hospital")
    assert sorted(i["namespace"] for i in st["inputs"] if i["state"] == "Included") == [a, b]

    # Viewers of the forge and of the hospitals see no URL in Jobs or pods.
    cluster.kubectl(
        "create",
        "rolebinding",
        "auditor",
        "-n",
        forge_namespace,
        "--clusterrole=view",
        f"--serviceaccount={a}:auditor",
    )
    for ns in (forge_namespace, a):
        for kind in ("jobs", "pods"):
            out = cluster.kubectl("get", kind, "-n", ns, "-o", "yaml", as_(a, "auditor"))
            assert "kind: " in out.stdout and not URL.search(out.stdout), out.stdout[:2000]
        out = cluster.kubectl("get", "secrets", "-n", ns, as_(a, "auditor"), check=False)
        assert out.returncode != 0 and "forbidden" in out.stderr
    # The composite's status names inputs by reason code, never another hospital's messages.
    text = json.dumps(status(cluster, "cmodel", forge_namespace, "pool"))
    assert "hospital-data" not in text and not URL.search(text)


def test_a_composite_outside_a_forge_namespace_stalls(
    cluster: ClusterAccess, hospitals: list[str], base: tuple[str, str]
) -> None:
    a, _ = hospitals
    cluster.apply(a, composite("mine", base, a.split("-")[1]))

    def stalled() -> dict[str, Any] | None:
        st = status(cluster, "cmodel", a, "mine")
        return st if condition(st, "Stalled").get("status") == "True" else None

    st = wait_until(stalled, 60, what="a stalled composite")
    assert condition(st, "Stalled")["reason"] == "NotAForgeNamespace"
    assert "MEDFORGE_FORGE_NAMESPACES" in condition(st, "Stalled")["message"]
    assert "inputs" not in st
    time.sleep(2)
    assert cluster.kubectl("get", "jobs", "-n", a, "-o", "name").stdout.strip() == ""


def test_no_job_outside_member_namespaces(cluster: ClusterAccess, base: tuple[str, str]) -> None:
    ns = f"unmanaged-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", ns)
    try:
        cluster.apply(ns, contribution("outside", base))

        def stalled() -> dict[str, Any] | None:
            st = status(cluster, "lorac", ns, "outside")
            return st if condition(st, "Stalled").get("reason") == "NamespaceNotManaged" else None

        st = wait_until(stalled, 60, what="NamespaceNotManaged")
        assert "medforge.io/member=true" in condition(st, "Stalled")["message"]
        assert cluster.kubectl("get", "jobs", "-n", ns, "-o", "name").stdout.strip() == ""
        cluster.kubectl("label", "namespace", ns, "medforge.io/member=true")
        wait_phase(cluster, ns, "outside", "Succeeded", 90)
    finally:
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


@pytest.fixture
def short_urls_operator(
    cluster: ClusterAccess, crds: None, forge: Forge, operator: OperatorProcess, tmp_path: Path
) -> Iterator[OperatorProcess]:
    """An operator whose presigned URLs live one minute (the shared one pauses meanwhile)."""
    operator.stop()
    op = OperatorProcess(
        cluster, forge, tmp_path / "operator.log", MEDFORGE_PRESIGN_EXPIRY_SECONDS="60"
    )
    op.start()
    yield op
    op.stop()
    operator.start()


def test_a_job_queued_past_its_urls_lifetime_still_succeeds(
    cluster: ClusterAccess,
    namespace: str,
    base: tuple[str, str],
    short_urls_operator: OperatorProcess,
) -> None:
    cluster.apply(namespace, contribution("queued", base, resources={"queueName": "gpu"}))

    def created() -> dict[str, Any] | None:
        st = status(cluster, "lorac", namespace, "queued")
        return st if condition(st, "Ready").get("reason") == "JobCreated" else None

    wait_until(created, 60, what="the queued Job")
    # While it waits in the queue, no URL exists at all.
    out = cluster.kubectl("get", "secret", "queued-train-g1-config", "-n", namespace, check=False)
    assert out.returncode != 0 and "NotFound" in out.stderr
    time.sleep(65)  # longer than the URLs would have lived
    admitted = time.time()
    cluster.kubectl(
        "patch", "job", "queued-train-g1", "-n", namespace, "-p", '{"spec": {"suspend": false}}'
    )
    st = wait_phase(cluster, namespace, "queued", "Succeeded", 90, short_urls_operator)
    assert st["job"]["attempts"] == 1
    secret = get_json(cluster, "secret", "queued-train-g1-config", "-n", namespace)
    expires = secret["metadata"]["annotations"]["medforge.io/urls-expire-at"]
    # Signed when the Job was admitted, not when it was queued.
    assert time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(admitted + 55)) <= expires


def test_the_readme_can_i_table_holds(cluster: ClusterAccess, tenant_roles: None) -> None:
    """Every row of docs/tenancy.md's `kubectl auth can-i` table, checked against the cluster with
    the chart's operator ClusterRole and the tenant roles."""
    ns = f"canitable-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", ns)
    docs = render(ns, Forge("forge-bucket", "http://s3", "a", "s"))
    ops = [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding", "ServiceAccount")]
    ops = [d for d in ops if "operator" in d["metadata"]["name"]]
    cluster.apply(ns, "\n---\n".join(yaml.safe_dump(d) for d in ops))
    roles = (
        ("engineer", "medforge-contributor"),
        ("editor", "edit"),
        ("owner", "admin"),
        ("auditor", "view"),
    )
    for sa, role in roles:
        bind(cluster, ns, sa, role)
    who = {
        "operator": "medforge-operator",
        "contributor": "engineer",
        "edit": "editor",
        "admin": "owner",
        "viewer": "auditor",
    }
    columns = ("operator", "contributor", "edit", "admin", "viewer")
    rows = [
        [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        for line in (ROOT / "docs" / "tenancy.md").read_text().splitlines()
        if line.startswith("| `") and "can-i" not in line
    ]
    table = [r for r in rows if len(r) == 1 + len(columns) and r[1] in ("yes", "no")]
    assert len(table) >= 15, rows
    # The data-protection officer keeps the budgets and nothing else of the hospital's.
    bind(cluster, ns, "officer", "medforge-data-protection")
    for action, expected in (
        ("create privacybudgets.medforge.io", "yes"),
        ("patch privacybudgets.medforge.io --subresource=status", "no"),
        ("create loracontributions.medforge.io", "no"),
        ("get secrets", "no"),
    ):
        out = cluster.kubectl(
            "auth", "can-i", *action.split(), "-n", ns, as_(ns, "officer"), check=False
        )
        assert out.stdout.strip() == expected, (action, out.stdout, out.stderr)
    # Whoever verifies revisions offline reads the Institutions' public keys, cluster-wide
    # (a ClusterRoleBinding), and can change none of them.
    cluster.kubectl("create", "serviceaccount", "verifier", "-n", ns)
    cluster.kubectl("create", "clusterrolebinding", f"{ns}-verifier",
                    "--clusterrole=medforge-trust-reader", f"--serviceaccount={ns}:verifier")  # fmt: skip
    for action, expected in (("list institutions.medforge.io", "yes"),
                             ("patch institutions.medforge.io", "no")):  # fmt: skip
        out = cluster.kubectl("auth", "can-i", *action.split(), as_(ns, "verifier"), check=False)
        assert out.stdout.strip() == expected, (action, out.stdout, out.stderr)
    try:
        for action, *answers in table:
            args = action.split()
            for column, expected in zip(columns, answers, strict=True):
                out = cluster.kubectl(
                    "auth", "can-i", *args, "-n", ns, as_(ns, who[column]), check=False
                )
                assert out.stdout.strip() == expected, (action, column, out.stdout, out.stderr)
    finally:
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        role = f"medforge-operator-{ns}"
        cluster.kubectl("delete", "clusterrolebinding,clusterrole", role, check=False)
        cluster.kubectl("delete", "clusterrolebinding", f"{ns}-verifier", check=False)
