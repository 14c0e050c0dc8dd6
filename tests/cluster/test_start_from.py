"""spec.startFrom on the local cluster: a hospital trains from the composite's latest revision
once every input consented to publication, its Job reads the revision's update only, the
composite merges it relative to that revision, refused parents say why, a manifest that names
another revision is refused, and a withdrawal of an input the parent held cascades to it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.builders import contribution
from tests.cluster.conftest import Forge, base_model
from tests.cluster.test_composite import composite_doc, tagged_members
from tests.cluster.test_operator import condition, status, wait_phase
from tests.cluster.test_withdrawal import accepted
from tests.conftest import ClusterAccess
from tests.helpers import wait_until

pytestmark = pytest.mark.usefixtures("operator")


@pytest.fixture
def hospitals(cluster: ClusterAccess) -> Iterator[tuple[str, list[str]]]:
    yield from tagged_members(cluster, "branch", 3)


def reason(cluster: ClusterAccess, ns: str, name: str, want: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        st = status(cluster, "lorac", ns, name)
        return st if condition(st, "Ready").get("reason") == want else None

    return wait_until(check, 60, what=f"{ns}/{name} Ready reason {want}")


def test_a_hospital_branches_from_the_latest_revision(
    cluster: ClusterAccess,
    forge_namespace: str,
    forge: Forge,
    hospitals: tuple[str, list[str]],
) -> None:
    ns = forge_namespace
    tag, (first, second, lab) = hospitals
    base = base_model(cluster, forge, "clip-branch")
    publish = {"namespaceSelector": {"matchLabels": {"medforge.io/forge": tag}}}
    cluster.apply(ns, composite_doc(base, tag, minContributions=2, publish=publish))
    shared = {"forges": [f"{ns}/forge"], "publish": True}
    cluster.apply(first, contribution("a", base, task="breakhis", sharing=shared))
    cluster.apply(second, contribution("b", base, task="lung", sharing={"forges": [f"{ns}/forge"]}))
    rev1 = accepted(cluster, ns, 1)["current"]

    # The second hospital has not consented to publication: no Job, and the reason.
    start = {"composite": f"{ns}/forge", "revision": "latest"}
    cluster.apply(lab, contribution("c", base, task="colon", startFrom=start, sharing=shared))
    st = reason(cluster, lab, "c", "ParentNotConsented")
    assert second not in condition(st, "Ready")["message"]  # no other hospital is named
    assert not cluster.kubectl("get", "jobs", "-n", lab, "-o", "name").stdout.strip()
    for name, start_, why in (
        ("far", {"composite": f"{ns}/forge", "revision": 9}, "ParentNotFound"),
        ("none", {"composite": f"{ns}/nothing"}, "ParentNotPublished"),
    ):
        cluster.apply(lab, contribution(name, base, task="colon", startFrom=start_, sharing=shared))
        reason(cluster, lab, name, why)

    # It consents (a spec change: the forge pauses so that its retrained update waits): the
    # branch trains from revision 1 (the stand-in trainer checks that it was given the
    # manifest and the merged update only, against the digest).
    patch(cluster, "cmodel", "forge", ns, {"spec": {"paused": True}})
    patch(cluster, "lorac", "b", second, {"spec": {"sharing": {"publish": True}}})
    st = wait_phase(cluster, lab, "c", "Succeeded", 90)
    given = {"composite": f"{ns}/forge", "revision": 1, "digest": rev1["digest"]}
    assert st["startFrom"] == given and st["artifact"]["parent"] == given
    wait_phase(cluster, second, "b", "Succeeded", 90)

    # The composite merges it relative to revision 1, which it still serves (stale by 0),
    # beside the retrained update merged as usual.
    patch(cluster, "cmodel", "forge", ns, {"spec": {"paused": False}})
    cur = accepted(cluster, ns, 2)["current"]
    branch = next(i for i in cur["inputs"] if i["namespace"] == lab)
    assert branch["parent"] == {"revision": 1, "digest": rev1["digest"], "stale": 0}
    # A branch pinned to revision 1 once revision 2 is served is rebased: stale by 1.
    pinned = {"composite": f"{ns}/forge", "revision": 1}
    cluster.apply(lab, contribution("d", base, task="colon", startFrom=pinned, sharing=shared))
    cur = accepted(cluster, ns, 3)["current"]
    branch = next(i for i in cur["inputs"] if i["name"] == "d")
    assert branch["parent"] == {"revision": 1, "digest": rev1["digest"], "stale": 1}

    # A trainer that names another revision in its manifest is refused.
    liar = contribution("liar", base, task="lie-parent", startFrom=start, sharing=shared)
    cluster.apply(lab, liar)
    st = wait_phase(cluster, lab, "liar", "Failed", 90)
    assert "meta.parent" in condition(st, "Ready")["message"]

    # The first hospital leaves: every revision held it, so the branches leave with them.
    cluster.kubectl("delete", "lorac", "a", "-n", first)
    st = accepted(cluster, ns, 4)
    assert {i["namespace"] for i in st["current"]["inputs"]} == {second}
    shown = {i["name"]: i for i in st["inputs"] if i["namespace"] == lab}
    assert shown["c"]["reason"] == shown["d"]["reason"] == "ParentWithdrawn"
    events = json.loads(cluster.kubectl("get", "events", "-n", lab, "-o", "json").stdout)
    told = [e for e in events["items"] if e["reason"] == "ParentWithdrawn"]
    assert len(told) == 2 and "train again" in told[0]["message"]


def patch(cluster: ClusterAccess, kind: str, name: str, ns: str, body: dict[str, Any]) -> None:
    cluster.kubectl("patch", kind, name, "-n", ns, "--type=merge", "-p", json.dumps(body))
