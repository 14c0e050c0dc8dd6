"""The privacy ledger on the local cluster: a data-protection officer's PrivacyBudget admits
differentially private contributions until its epsilon is spent, refuses the one that would
exceed it and the one without differential privacy (a reason, no Job), lets a refused one train
once the officer raises the total, keeps reservations of deleted contributions, never lets two
contributions admitted together overspend, and a composite's spec.privacy.maxEpsilon excludes
inputs by the granted figure."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.cluster.conftest import Forge, base_model
from tests.cluster.test_composite import composite_doc, contribution
from tests.cluster.test_operator import condition, status, wait_phase
from tests.conftest import ClusterAccess
from tests.helpers import get_json, wait_until

pytestmark = pytest.mark.usefixtures("operator")
SCANS = "s3://hospital-data/scans/"


def budget(cluster: ClusterAccess, ns: str, epsilon: float) -> None:
    doc = {
        "apiVersion": "medforge.io/v1alpha1",
        "kind": "PrivacyBudget",
        "metadata": {"name": "scans"},
        "spec": {"dataset": {"uri": SCANS}, "epsilon": epsilon, "delta": 1e-4},
    }
    cluster.apply(ns, json.dumps(doc))


def dp(name: str, base: tuple[str, str], epsilon: float | None, uri: str = SCANS) -> str:
    privacy = {} if epsilon is None else {"privacy": {"epsilon": epsilon, "delta": 1e-5}}
    return contribution(name, base, task=name, dataset={"uri": uri}, **privacy)


def refused(cluster: ClusterAccess, ns: str, name: str, reason: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        st = status(cluster, "lorac", ns, name)
        return st if condition(st, "Stalled").get("reason") == reason else None

    st = wait_until(check, 60, what=f"{name} refused with {reason}")
    assert st["phase"] == "Pending" and "job" not in st
    jobs = get_json(cluster, "jobs", "-n", ns)["items"]
    assert not [j for j in jobs if j["metadata"]["name"].startswith(f"{name}-")]
    return st


def ledger(cluster: ClusterAccess, ns: str) -> dict[str, Any]:
    st: dict[str, Any] = get_json(cluster, "pbudget", "scans", "-n", ns).get("status") or {}
    return st


def test_a_budget_admits_until_spent_and_refuses_with_a_reason(
    cluster: ClusterAccess, namespace: str, forge: Forge, forge_namespace: str
) -> None:
    ns = namespace
    base = base_model(cluster, forge, "clip-privacy")
    budget(cluster, ns, 4)
    cluster.apply(ns, dp("first", base, 3))
    st = wait_phase(cluster, ns, "first", "Succeeded")
    assert st["privacy"]["epsilon"] == 3 and st["privacy"]["budgets"] == ["scans"]
    spent = ledger(cluster, ns)
    assert spent["spent"]["epsilon"] == 3 and spent["remaining"]["epsilon"] == 1
    assert [e["contribution"] for e in spent["entries"]] == ["first"]

    cluster.apply(ns, dp("second", base, 3))
    st = refused(cluster, ns, "second", "PrivacyBudgetExceeded")
    assert "epsilon 1 " in condition(st, "Stalled")["message"]
    cluster.apply(ns, dp("plain", base, None))
    refused(cluster, ns, "plain", "PrivacyRequired")

    # The officer raises the total: the refused contribution trains without being touched.
    budget(cluster, ns, 10)
    wait_phase(cluster, ns, "second", "Succeeded")
    # A deleted contribution's reservation stays: it touched the data.
    cluster.kubectl("delete", "lorac", "first", "-n", ns)
    assert ledger(cluster, ns)["spent"]["epsilon"] == 6

    # Two applied together with room for one: exactly one is admitted.
    both = "\n---\n".join([dp("left", base, 3), dp("right", base, 3)])
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=both)

    def settled() -> list[str] | None:
        phases = {n: status(cluster, "lorac", ns, n) for n in ("left", "right")}
        done = [
            n
            for n, st in phases.items()
            if st.get("phase") == "Succeeded"
            or condition(st, "Stalled").get("reason") == "PrivacyBudgetExceeded"
        ]
        return done if len(done) == 2 else None

    wait_until(settled, 90, what="both contributions admitted or refused")
    phases = sorted(status(cluster, "lorac", ns, n).get("phase", "") for n in ("left", "right"))
    assert phases == ["Pending", "Succeeded"]
    assert ledger(cluster, ns)["spent"]["epsilon"] == 9

    # A composite that requires epsilon 2 or less: "second" (3) is excluded by the ledger's
    # figure; a contribution with epsilon 1 on a dataset without a budget is merged.
    cluster.apply(ns, dp("strong", base, 1, uri="s3://hospital-data/other/"))
    wait_phase(cluster, ns, "strong", "Succeeded")
    cluster.apply(
        forge_namespace, composite_doc(base, None, minContributions=1, privacy={"maxEpsilon": 2})
    )

    def verdicts() -> dict[str, str] | None:
        st = status(cluster, "cmodel", forge_namespace, "forge")
        found = {i["name"]: i["reason"] for i in st.get("inputs") or [] if i["namespace"] == ns}
        merged = (st.get("current") or {}).get("inputs") or []
        return found if merged and "second" in found else None

    found = wait_until(verdicts, 90, what="the composite's verdicts")
    assert found["second"] == "PrivacyBudgetTooLarge" and found["strong"] == "Merged"
