"""A candidate at the sites, round by round (reconcile_evaluation.advance) against fake clients:
what a hospital with `edit` can write into its own set never makes a round raise or keeps the
candidate from being decided; a base model that became unusable or a set that left does not
stall it; a store that does not answer postpones the decision and is never a verdict; the
forge's status keeps headline figures while the set's own status gets per-class recall."""

from __future__ import annotations

import json
from typing import Any, cast

import pytest

from medforge_common.uris import S3Uri
from medforge_operator import EVALUATIONSETS, composite, evaluation, reconcile_evaluation
from medforge_operator.catalog import Catalog
from medforge_operator.composite import sites
from medforge_operator.store import ForgeStore, ObjectMissing, StoreUnreachable
from tests.unit.test_composite_logic import DIGEST, SETTINGS, FakeKube, comp

pytestmark = pytest.mark.unit
JSON = dict[str, Any]
T0, LATER = "2026-12-07T10:00:00Z", "2026-12-07T12:00:00Z"
FIGS = {"accuracy": 0.9, "f1": 0.9, "auc": 0.95, "samples": 40, "classes": 2,
        "recall": {"a": 0.9, "b": 0.9}}  # fmt: skip


def evs(ns: str, uri: str = "s3://data/held/") -> JSON:
    return {
        "kind": "EvaluationSet",
        # Named apart: the fake keeps Jobs by name only.
        "metadata": {"namespace": ns, "name": f"held-{ns}", "uid": f"e-{ns}", "generation": 1},
        "spec": {
            "task": {"name": "t", "classes": ["a", "b"]},
            "dataset": {"uri": uri},
            "forges": ["forge/f"],
        },
        "status": {},
    }


class Kube(FakeKube):
    def __init__(self, sets: list[JSON]) -> None:
        super().__init__([comp()])
        self.sets = {s["metadata"]["namespace"]: s for s in sets}
        self.set_statuses: dict[str, JSON] = {}

    def get_object(self, plural: str, ns: str, name: str) -> JSON | None:
        if plural == EVALUATIONSETS:
            return self.sets.get(ns)
        return super().get_object(plural, ns, name)

    def iter_objects(self, plural: str, ns: str | None = None, selector: str = "") -> Any:
        if plural == EVALUATIONSETS:
            return iter(list(self.sets.values()))
        return iter([])

    def patch_status(
        self, plural: str, ns: str, name: str, status: JSON, resource_version: str | None = None
    ) -> None:
        if plural == EVALUATIONSETS:
            self.set_statuses[ns] = status
            self.sets[ns]["status"] = status
            return
        super().patch_status(plural, ns, name, status, resource_version)


class Store:
    def __init__(self) -> None:
        self.s, self.bucket = SETTINGS, "forge"
        self.results: dict[str, Any] = {}
        self.down = False

    def presign_get(self, uri: S3Uri, expires: int | None = None) -> str:
        return f"https://s3/{uri.key}?sig"

    def presign_put(self, uri: S3Uri, expires: int | None = None) -> str:
        return f"https://s3/{uri.key}?put"

    def read_json(self, prefix: S3Uri, ref: Any, limit: int, artifact: bool = True) -> Any:
        if self.down:
            raise StoreUnreachable("the forge store at http://s3 is unreachable")
        for ns, raw in self.results.items():
            if f"/{ns}/held-{ns}/" in prefix.key:
                return raw
        raise ObjectMissing(prefix, "missing")


def pending(kube: Kube) -> JSON:
    found = reconcile_evaluation.consenting_sets(
        comp(), kube, SETTINGS, Catalog(kube, cast(ForgeStore, Store()), SETTINGS), {"t"}
    )
    return {
        "revision": 2,
        "baseDigest": DIGEST,
        "digests": ["sha256:new"],
        "evaluation": {
            "startedAt": T0,
            "deadline": "2026-12-07T11:00:00Z",
            "result": {
                "artifact": {"digest": "sha256:" + "c" * 64, "files": ["adapter.safetensors"]}
            },
            "sites": [evaluation.site_record(e) for e in found],
        },
    }


def step(kube: Kube, store: Store, p: JSON, at: str) -> composite.Observation:
    o = composite.Observation(1)
    st = cast(ForgeStore, store)
    reconcile_evaluation.advance(comp(), p, o, kube, st, SETTINGS, Catalog(kube, st, SETTINGS), at)
    return o


def test_a_hostile_dataset_uri_fails_that_site_only() -> None:
    kube = Kube([evs("h-a", "s3://abc/../x"), evs("h-b")])
    store = Store()
    o = step(kube, store, pending(kube), T0)
    by = {s["namespace"]: s for s in o.evaluating["evaluation"]["sites"]}  # type: ignore[index]
    assert by["h-a"]["state"] == sites.FAILED and "spec" in by["h-a"]["message"]
    assert by["h-b"]["state"] == sites.PENDING and by["h-b"]["jobUid"]
    store.results["h-b"] = {"state": "Reported", "candidate": FIGS}
    o = step(kube, store, o.evaluating, T0)  # type: ignore[arg-type]
    assert o.outcome is not None and o.outcome.state == "Accepted"  # 1 of 2 meets 50 %


def test_an_unusable_base_model_does_not_keep_the_candidate_forever() -> None:
    kube = Kube([evs("h-a")])
    kube.base_digest = "sha256:" + "e" * 64  # registered again: the pin no longer resolves
    store = Store()
    o = step(kube, store, pending(kube), T0)
    assert o.evaluating is not None and kube.created == []  # no Job, no URL
    o = step(kube, store, o.evaluating, LATER)
    assert o.outcome is not None and o.outcome.reason == "QuorumNotReached"
    assert o.outcome.awaiting == ["sha256:new"]


def test_a_store_outage_postpones_the_decision() -> None:
    kube = Kube([evs("h-a")])
    store = Store()
    o = step(kube, store, pending(kube), T0)
    store.down = True
    o = step(kube, store, o.evaluating, LATER)  # type: ignore[arg-type]
    assert o.outcome is not None and o.outcome.state == "StoreUnreachable"
    assert o.evaluating is not None  # still at the sites, decided once the store answers
    store.down = False
    o = step(kube, store, o.evaluating, LATER)
    assert o.outcome is not None and o.outcome.reason == "QuorumNotReached"


def test_a_set_that_leaves_no_longer_counts() -> None:
    kube = Kube([evs("h-a"), evs("h-b")])
    store = Store()
    o = step(kube, store, pending(kube), T0)
    kube.sets["h-b"]["spec"]["forges"] = []  # consent withdrawn
    store.results["h-a"] = {"state": "Reported", "candidate": FIGS}
    o = step(kube, store, o.evaluating, T0)  # type: ignore[arg-type]
    assert o.outcome is not None and o.outcome.state == "Accepted"
    assert [s["site"] for s in o.outcome.sites] == ["h-a/held-h-a"]


def test_recall_stays_in_the_sets_own_status() -> None:
    kube = Kube([evs("h-a")])
    store = Store()
    store.results["h-a"] = {"state": "Reported", "candidate": FIGS, "overlap": 3}
    o = step(kube, store, pending(kube), T0)
    assert o.outcome is not None and o.outcome.state == "Accepted"
    (kept,) = o.outcome.sites
    assert "recall" not in json.dumps(kept) and kept["candidate"]["accuracy"] == 0.9
    (scored,) = kube.set_statuses["h-a"]["scored"]
    assert scored["candidate"]["recall"] == {"a": 0.9, "b": 0.9} and scored["overlap"] == 3
    assert scored["verdict"] == "Accepted" and scored["revision"] == 2
    assert [e[2] for e in o.site_events] == ["TrainingOverlap"]


def test_a_huge_timeout_is_capped() -> None:
    rule = sites.SiteRule.from_spec({"sites": {"timeout": "99999999999d"}})
    assert rule.timeout == sites.MAX_TIMEOUT


def test_a_new_pending_revision_never_keeps_the_previous_ones_evaluation() -> None:
    from medforge_operator.statuswrite import status_patch

    old = {"pendingRevision": {"revision": 1, "jobUid": "a", "evaluation": {"sites": []}}}
    new = {"pendingRevision": {"revision": 2, "jobUid": "b"}}
    patch = status_patch(old, new)
    assert patch["pendingRevision"] == {"revision": 2, "jobUid": "b", "evaluation": None}
    assert status_patch({"current": {"a": 1}}, {"current": {"a": 1, "b": {"c": 2}}}) == {
        "current": {"a": 1, "b": {"c": 2}}
    }
