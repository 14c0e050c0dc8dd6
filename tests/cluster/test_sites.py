"""The site gate on the local cluster: three hospitals score each candidate on their own
held-out images (EvaluationSets, Jobs in their own namespaces). A site that never reports does
not block once the quorum is met; a set below minSamples reports TooSmall and no figure of it
reaches the forge; a site whose images regress rejects the candidate (SiteRegression), the new
input that causes it is excluded, and that hospital hears it with its figures."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.builders import contribution as private_contribution
from tests.cluster.conftest import Forge, base_model
from tests.cluster.test_composite import composite_doc, revision_state, tagged_members
from tests.cluster.test_operator import status
from tests.conftest import ClusterAccess
from tests.helpers import wait_until

pytestmark = pytest.mark.usefixtures("operator")


@pytest.fixture
def hospitals(cluster: ClusterAccess) -> Iterator[tuple[str, list[str]]]:
    yield from tagged_members(cluster, "site", 3)


@pytest.fixture
def outsider(cluster: ClusterAccess) -> Iterator[tuple[str, list[str]]]:
    yield from tagged_members(cluster, "outsider", 1)


def evaluation_set(forge_ns: str, data: str, min_samples: int = 20) -> str:
    return json.dumps(
        {
            "apiVersion": "medforge.io/v1alpha1",
            "kind": "EvaluationSet",
            "metadata": {"name": "held-out"},
            "spec": {
                "task": {"name": "breakhis", "classes": ["benign", "malignant"]},
                "dataset": {"uri": f"s3://site-data/{data}/"},
                "forges": [f"{forge_ns}/forge"],
                "minSamples": min_samples,
            },
        }
    )


def test_sites_gate_a_candidate_on_their_own_images(
    cluster: ClusterAccess,
    forge_namespace: str,
    forge: Forge,
    hospitals: tuple[str, list[str]],
    outsider: tuple[str, list[str]],
) -> None:
    ns = forge_namespace
    tag, (first, second, third) = hospitals
    base = base_model(cluster, forge, "clip-sites")
    gate = {"maxRegression": 0.1, "sites": {"quorum": 2, "maxRegression": 0.05, "timeout": "15s"}}
    cluster.apply(ns, composite_doc(base, tag, gate=gate))
    cluster.apply(first, evaluation_set(ns, "ok"))
    cluster.apply(second, evaluation_set(ns, "small"))
    cluster.apply(third, evaluation_set(ns, "never"))
    # Shared with this test's forge only: no other test's composite picks them up.
    cluster.apply(first, private_contribution("first", base, sharing={"forges": [f"{ns}/forge"]}))
    # A member namespace outside the consortium (the composite's namespace selector) names the
    # composite too: it is never a site, so it never receives a candidate's files.
    cluster.apply(outsider[1][0], evaluation_set(ns, "ok"))

    # Revision 1: the first site reports, the second is too small, the third never answers;
    # the quorum (2) is met, so the timeout accepts it.
    def evaluating() -> dict[str, Any] | None:
        st = status(cluster, "cmodel", ns, "forge")
        return st if st.get("phase") == "Evaluating" else None

    st = wait_until(evaluating, 90, what="revision 1 at the sites")
    assert {s["site"] for s in st["pendingRevision"]["evaluation"]["sites"]} == {
        f"{h}/held-out" for h in (first, second, third)
    }
    st = revision_state(cluster, ns, 1, None)
    one = st["history"][0]
    assert one["state"] == "Accepted", one
    by_site = {s["site"].split("/")[0]: s for s in one["sites"]}
    assert by_site[first]["state"] == "Reported"
    assert by_site[first]["candidate"]["samples"] == 200
    assert "served" not in by_site[first]  # nothing served before revision 1
    assert by_site[second] == {
        "site": f"{second}/held-out",
        "task": "breakhis",
        "state": "TooSmall",
    }
    assert by_site[third]["state"] == "NotReported"
    assert st["current"]["revision"] == 1
    # The silent site's Job was stopped once the candidate was decided.
    jobs = json.loads(cluster.kubectl("get", "jobs", "-n", third, "-o", "json").stdout)["items"]
    assert not [j for j in jobs if j["metadata"]["name"].startswith("held-out-eval-")]

    # A viewer of the forge sees no figure of the small site anywhere in the composite.
    viewer = f"--as=system:serviceaccount:{ns}:viewer"
    cluster.kubectl(
        "create", "role", "forge-reader", "--verb=get",
        "--resource=compositemodels.medforge.io", "-n", ns,
    )  # fmt: skip
    cluster.kubectl(
        "create", "rolebinding", "forge-viewer", "--role=forge-reader",
        f"--serviceaccount={ns}:viewer", "-n", ns,
    )  # fmt: skip
    seen = json.loads(
        cluster.kubectl("get", "cmodel", "forge", "-n", ns, "-o", "json", viewer).stdout
    )
    small = [
        s
        for h in seen["status"]["history"]
        for s in h.get("sites") or []
        if s["site"].startswith(second)
    ]
    assert small and all(set(s) == {"site", "task", "state"} for s in small)
    scored = status(cluster, "evs", second, "held-out")["scored"][0]
    assert scored["state"] == "TooSmall" and "candidate" not in scored

    # Revision 2: the first site's images now show a regression against revision 1.
    cluster.kubectl(
        "patch", "evs", "held-out", "-n", first, "--type=merge",
        "-p", json.dumps({"spec": {"dataset": {"uri": "s3://site-data/regress/"}}}),
    )  # fmt: skip
    cluster.kubectl("delete", "evs", "held-out", "-n", third)  # it leaves; quorum 2 of 2
    cluster.apply(second, private_contribution("second", base, sharing={"forges": [f"{ns}/forge"]}))
    st = revision_state(cluster, ns, 2, None)
    two = st["history"][0]
    assert two["state"] == "Rejected" and two["reason"] == "SiteRegression", two
    assert st["current"]["revision"] == 1
    regressed = next(s for s in two["sites"] if s["site"].startswith(first))
    assert regressed["candidate"]["accuracy"] < regressed["served"]["accuracy"] - 0.3
    # Blame: the one new input is excluded by the gate, and its hospital stays out.
    second_input = next(i for i in st["inputs"] if i["namespace"] == second)
    assert second_input["state"] == "Excluded" and second_input["reason"] == "RejectedByGate"
    # The regressed hospital hears it in its own namespace, with its figures.
    events = json.loads(cluster.kubectl("get", "events", "-n", first, "-o", "json").stdout)
    told = [e for e in events["items"] if e["reason"] == "SiteRegression"]
    assert told and "accuracy is 0.500" in told[0]["message"], told
    scored = status(cluster, "evs", first, "held-out")["scored"][0]
    assert scored["revision"] == 2 and scored["verdict"] == "Rejected: SiteRegression"
