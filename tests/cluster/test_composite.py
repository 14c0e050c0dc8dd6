"""CompositeModel revisions: asynchronous arrivals, base-model mismatch, the regression gate,
pause, and deletion of an input (a withdrawal, even while paused)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.builders import contribution as private_contribution
from tests.cluster.conftest import FORGE_POOL, Forge, base_model
from tests.cluster.test_operator import condition, status, wait_phase
from tests.conftest import ClusterAccess
from tests.helpers import get_json, wait_until

pytestmark = pytest.mark.usefixtures("operator")


def tagged_members(
    cluster: ClusterAccess, prefix: str, count: int
) -> Iterator[tuple[str, list[str]]]:
    """A label value and `count` member namespaces carrying it (medforge.io/forge=<tag>),
    deleted afterwards."""
    tag = uuid.uuid4().hex[:6]
    spaces = [f"{prefix}-{tag}-{i}" for i in range(count)]
    for ns in spaces:
        cluster.kubectl("create", "namespace", ns)
        cluster.kubectl(
            "label", "namespace", ns, f"medforge.io/forge={tag}", "medforge.io/member=true"
        )
    yield tag, spaces
    for ns in spaces:
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


@pytest.fixture
def institutions(cluster: ClusterAccess) -> Iterator[tuple[str, list[str]]]:
    """A label value and two institution namespaces carrying it."""
    yield from tagged_members(cluster, "hospital", 2)


def contribution(name: str, base: tuple[str, str], task: str = "breakhis", **spec: Any) -> str:
    """A contribution its owner shares with every forge namespace's composite `forge`."""
    shared = [f"{ns}/forge" for ns in FORGE_POOL]
    return private_contribution(name, base, task, sharing={"forges": shared}, **spec)


def composite_doc(base: tuple[str, str], tag: str | None, **spec: Any) -> str:
    """The forge's composite `forge` over the tests' labelled contributions, from the
    namespaces labelled medforge.io/forge=<tag> (any shared namespace without a tag)."""
    contributions: dict[str, Any] = {"selector": {"matchLabels": {"medforge.io/test": "yes"}}}
    if tag is not None:
        contributions["namespaceSelector"] = {"matchLabels": {"medforge.io/forge": tag}}
    return json.dumps(
        {
            "apiVersion": "medforge.io/v1alpha1",
            "kind": "CompositeModel",
            "metadata": {"name": "forge"},
            "spec": {
                "baseModel": {"name": base[0]},
                "contributions": contributions,
                "gate": {"maxRegression": 0.1},
                **spec,
            },
        }
    )


def revision_state(
    cluster: ClusterAccess, ns: str, revision: int, state: str | None
) -> dict[str, Any]:
    """The composite's status once `revision` is the newest in its history (in `state`, unless
    None: decided either way)."""

    def check() -> dict[str, Any] | None:
        st = status(cluster, "cmodel", ns, "forge")
        hist = st.get("history") or []
        if not hist or hist[0]["revision"] != revision:
            return None
        return st if state is None or hist[0]["state"] == state else None

    try:
        return wait_until(check, 90, what=f"revision {revision} {state}")
    except AssertionError as exc:
        st = status(cluster, "cmodel", ns, "forge")
        raise AssertionError(f"{exc}; status: {json.dumps(st, indent=1)[:3000]}") from None


def test_revisions_follow_contributions(
    cluster: ClusterAccess, forge_namespace: str, forge: Forge, institutions: tuple[str, list[str]]
) -> None:
    namespace = forge_namespace
    tag, (a, b) = institutions
    base = base_model(cluster, forge, "clip-forge")
    other = base_model(cluster, forge, "other-model", config=b'{"model_type": "vit"}')
    cluster.apply(namespace, composite_doc(base, tag, minContributions=1))
    wait_until(lambda: status(cluster, "cmodel", namespace, "forge").get("phase") == "Waiting", 60)

    # First arrival: revision 1.
    cluster.apply(a, contribution("breakhis", base))
    st = revision_state(cluster, namespace, 1, "Accepted")
    assert st["current"]["revision"] == 1 and st["current"]["inputCount"] == 1
    assert (
        condition(st, "Ready")["status"] == "True" and condition(st, "Accepted")["status"] == "True"
    )
    first_digest = st["current"]["digest"]

    # Second arrival, another institution: revision 2, merged into revision 1 (incremental).
    cluster.apply(b, contribution("lung", base, task="lung"))
    st = revision_state(cluster, namespace, 2, "Accepted")
    assert st["current"]["inputCount"] == 2
    assert {(i["namespace"], i["state"]) for i in st["inputs"]} == {
        (a, "Included"),
        (b, "Included"),
    }
    table = cluster.kubectl("get", "cmodel", "-n", namespace).stdout
    assert "Ready" in table and " 2 " in table

    # A contribution for another base model is excluded, with the reason.
    cluster.apply(b, contribution("stranger", other))
    wait_phase(cluster, b, "stranger", "Succeeded")

    def excluded() -> dict[str, Any] | None:
        st = status(cluster, "cmodel", namespace, "forge")
        i = next((i for i in st.get("inputs") or [] if i["name"] == "stranger"), None)
        return i if i and i["state"] == "Excluded" else None

    assert wait_until(excluded, 60)["reason"] == "BaseModelMismatch"

    # A revision that regresses a task beyond the gate is not accepted.
    cluster.apply(a, contribution("noisy", base, task="regress-colon"))
    st = revision_state(cluster, namespace, 3, "Rejected")
    accepted = condition(st, "Accepted")
    assert accepted["status"] == "False" and accepted["reason"] == "RegressionOverGate"
    assert "regressed by 0.300" in accepted["message"]  # the tasks merged before
    assert st["current"]["revision"] == 2  # still serving the last accepted revision
    noisy = next(i for i in st["inputs"] if i["name"] == "noisy")
    assert noisy["state"] == "Excluded" and noisy["reason"] == "RejectedByGate"
    # Each side learns who uses what: the contribution lists the composite that merged it.
    used = status(cluster, "lorac", b, "lung").get("usedBy") or []
    assert {"composite": f"{namespace}/forge", "revision": 2} in used

    # Paused: a new contribution waits.
    cluster.kubectl(
        "patch",
        "cmodel",
        "forge",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec": {"paused": true}}',
    )
    wait_until(lambda: status(cluster, "cmodel", namespace, "forge").get("phase") == "Paused", 60)
    cluster.apply(b, contribution("late", base, task="late"))
    wait_phase(cluster, b, "late", "Succeeded")

    def queued() -> dict[str, Any] | None:
        st = status(cluster, "cmodel", namespace, "forge")
        i = next((i for i in st.get("inputs") or [] if i["name"] == "late"), None)
        return st if i and i["state"] == "Pending" else None

    st = wait_until(queued, 60)
    assert st["revision"] == 3 and st["phase"] == "Paused"

    # Deleting an included contribution withdraws it, paused or not: every revision that held
    # it is withdrawn, and revision 4 merges the rest afresh.
    cluster.kubectl("delete", "lorac", "breakhis", "-n", a)
    st = revision_state(cluster, namespace, 4, "Accepted")
    assert [i["name"] for i in st["current"]["inputs"]] == ["lung"]
    states = {h["revision"]: h["state"] for h in st["history"]}
    assert states == {1: "Withdrawn", 2: "Withdrawn", 3: "Withdrawn", 4: "Accepted"}
    assert st["current"]["digest"] != first_digest and st["phase"] == "Paused"

    # Unpaused: the queued contribution becomes revision 5.
    cluster.kubectl(
        "patch",
        "cmodel",
        "forge",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec": {"paused": false}}',
    )
    st = revision_state(cluster, namespace, 5, "Accepted")
    assert st["current"]["revision"] == 5 and len(st["history"]) == 5
    events = cluster.kubectl("get", "events", "-n", namespace).stdout
    assert "RevisionAccepted" in events and "RevisionRejected" in events


def test_a_full_merge_of_200_inputs_reports(
    cluster: ClusterAccess, forge_namespace: str, forge: Forge
) -> None:
    """200 contributions in one full revision: the merge's result (an entry per input, far
    beyond a 4 KiB termination message) reaches the status through result.json."""
    base = base_model(cluster, forge, "clip-wide")
    hospital = f"wide-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", hospital)
    cluster.kubectl(
        "label", "namespace", hospital, "medforge.io/member=true", "medforge.io/forge=wide"
    )
    try:
        docs = "\n---\n".join(
            contribution(f"site-{i:03d}", base, task=f"task-{i:03d}") for i in range(200)
        )
        cluster.apply(hospital, docs)
        doc = json.loads(composite_doc(base, "wide", minContributions=200, integration="full"))
        doc["spec"]["strategy"] = {"type": "linear"}
        cluster.apply(forge_namespace, json.dumps(doc))

        def merged() -> dict[str, Any] | None:
            st = status(cluster, "cmodel", forge_namespace, "forge")
            return st if (st.get("current") or {}).get("inputCount") == 200 else None

        st = wait_until(merged, 420, every=2, what="revision 1 with 200 inputs")
        assert st["current"]["revision"] == 1 and len(st["current"]["metrics"]) == 200
        assert st["inputCounts"]["Included"] == 200 and len(st["inputs"]) == 200
        pod = get_json(cluster, "pods", "-n", forge_namespace, "-l", "job-name=forge-merge-r1")
        message = pod["items"][0]["status"]["containerStatuses"][0]["state"]["terminated"]
        assert len(message["message"]) < 1024 and "resultFile" in message["message"]
    finally:
        cluster.kubectl("delete", "namespace", hospital, "--wait=false", check=False)
