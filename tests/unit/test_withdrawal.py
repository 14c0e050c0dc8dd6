"""Withdrawal, without a cluster: which inputs left, the revisions marked Withdrawn, what is
served meanwhile, the replacement's plan (a full merge of the rest, in order), the merge that
read a departed input stopped, the erasure's timing and prefixes, and a composite's rounds from
a hospital's deletion to its erasure receipt against fake clients."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from medforge_common.api import CompositePhase, EventReason, Reason, RevisionState
from medforge_common.api import WithdrawalReason as WR
from medforge_common.uris import S3Uri
from medforge_operator import composite, erasure
from medforge_operator.composite import withdrawal
from tests.unit.test_composite_logic import (
    BASE,
    FakeKube,
    FakeStore,
    comp,
    contribution,
    round_,
)

JSON = dict[str, Any]
A, B, C = "sha256:" + "1" * 64, "sha256:" + "2" * 64, "sha256:" + "3" * 64
SA, SB, SC = (withdrawal.source("h", n, d) for n, d in (("a", A), ("b", B), ("c", C)))


def entry(revision: int, inputs: list[str], state: str = RevisionState.ACCEPTED) -> JSON:
    return {
        "revision": revision,
        "state": state,
        "digest": f"sha256:r{revision}",
        "files": ["adapter.safetensors", "manifest.json"],
        "metrics": {"t": {"accuracy": 0.5 + revision / 10}},
        "inputs": inputs,
    }


def current(revision: int, *names: str) -> JSON:
    digests = {"a": A, "b": B, "c": C}
    return {
        "revision": revision,
        "uri": f"s3://forge/verified/composites/forge/f/cu/rev-{revision}/",
        "digest": f"sha256:r{revision}",
        "files": ["adapter.safetensors"],
        "mergeSeconds": 3.0,
        "inputs": [{"namespace": "h", "name": n, "digest": digests[n]} for n in names],
    }


THREE = {
    "revision": 3,
    "current": current(3, "a", "b", "c"),
    "history": [entry(3, [SA, SB, SC]), entry(2, [SA, SB]), entry(1, [SA])],
}


def test_durations() -> None:
    assert withdrawal.seconds("0s") == 0
    assert withdrawal.seconds("1d12h30m5s") == 131405
    with pytest.raises(ValueError, match="duration"):
        withdrawal.seconds("soon")
    assert withdrawal.settings({}) == (0, 3600)
    assert withdrawal.settings({"withdrawal": {"retention": "7d"}})[0] == 7 * 86400


def test_an_input_leaves_when_its_contribution_no_longer_consents() -> None:
    gone = withdrawal.departed(THREE, {("h", "a"), ("h", "c")})
    assert gone == [withdrawal.Departure("h", "b", B)]
    # Retrained (another digest, still consenting): its earlier update stays, as before.
    assert withdrawal.departed(THREE, {("h", "a"), ("h", "b"), ("h", "c")}) == []
    # Recorded already: not again.
    after = withdrawal.withdraw(THREE, gone, "2026-12-07T10:00:00Z").changes
    assert withdrawal.departed({**THREE, **after}, {("h", "a"), ("h", "c")}) == []


def test_every_revision_that_holds_it_is_withdrawn_and_the_newest_without_it_is_served() -> None:
    d = withdrawal.Departure("h", "b", B, WR.CONSENT_WITHDRAWN)
    w = withdrawal.withdraw(THREE, [d], "2026-12-07T10:00:00Z")
    assert not w.cancel
    history = w.changes["history"]
    assert [h["state"] for h in history] == ["Withdrawn", "Withdrawn", "Accepted"]
    assert history[0]["withdrawnReason"] == "ConsentWithdrawn"
    assert history[0]["withdrawnInput"] == "h/b" and history[0]["stateBefore"] == "Accepted"
    served = w.changes["current"]
    assert served["revision"] == 1 and served["uri"].endswith("/cu/rev-1/")
    assert [i["name"] for i in served["inputs"]] == ["a"]
    assert served["mergeSeconds"] is None  # blanked: the merge patch must not keep revision 3's
    assert w.changes["rebuild"]["inputs"] == [A, C]  # the rest, in their original order
    (record,) = w.changes["withdrawals"]
    assert record["revisions"] == [2, 3] and record["state"] == withdrawal.REPLACING


def test_the_only_input_leaving_leaves_nothing_to_serve() -> None:
    status = {"revision": 1, "current": current(1, "a"), "history": [entry(1, [SA])]}
    w = withdrawal.withdraw(status, [withdrawal.Departure("h", "a", A)], "2026-12-07T10:00:00Z")
    assert w.changes["current"] is None and w.changes["rebuild"] is None
    assert w.changes["withdrawals"][0]["state"] == withdrawal.ERASING


def test_a_pending_merge_that_reads_a_departed_input_is_stopped() -> None:
    # An incremental merge of a newcomer reads the served revision, which holds b.
    pending = {"revision": 4, "inputs": ["sha256:new"], "incremental": True, "sources": []}
    w = withdrawal.withdraw(
        {**THREE, "pendingRevision": pending}, [withdrawal.Departure("h", "b", B)], "t"
    )
    assert w.cancel and w.changes["pendingRevision"] is None
    assert w.changes["withdrawals"][0]["revisions"] == [2, 3, 4]
    # A full merge of other inputs goes on.
    other = {"revision": 4, "inputs": [A], "sources": [SA]}
    status = {**THREE, "pendingRevision": other, "current": current(3, "a", "c")}
    assert not withdrawal.withdraw(status, [withdrawal.Departure("h", "b", B)], "t").cancel


def test_the_replacement_is_a_full_merge_of_the_rest_in_order() -> None:
    w = withdrawal.withdraw(THREE, [withdrawal.Departure("h", "b", B)], "2026-12-07T10:00:00Z")
    status = {**THREE, **w.changes}
    contribs = [contribution("c", C, "t3"), contribution("a", A, "t1")]
    o = composite.Observation(1, base=BASE, contribs=contribs)
    obj = comp(status, paused=True)  # a withdrawal merges even while paused
    plan = composite.next_plan(obj, o, "2026-12-07T10:00:01Z")
    assert plan is not None and plan.replacement and plan.revision == 4 and plan.new == []
    assert [c["metadata"]["name"] for c in plan.all_inputs] == ["a", "c"]
    cfg = composite.merge_plan(obj, plan, BASE, S3Uri("forge", "composites/x/"), "forge")
    assert cfg["integration"] == "full" and "current" not in cfg
    assert [i["name"] for i in cfg["inputs"]] == ["a", "c"]
    assert not any(i["new"] for i in cfg["inputs"])
    assert "contributions/h/b/" not in json.dumps(cfg)
    # The gate compares with the revision served meanwhile (the fallback), on the tasks left.
    assert cfg["previous"]["revision"] == 1
    phase, conds = composite.conditions_for(status, False, None, None)
    ready = next(c for c in conds if c.type == "Ready")
    assert phase == CompositePhase.MERGING and ready.reason == Reason.WITHDRAWING
    assert ready.status and "serving revision 1" in ready.message


def test_after_the_replacement_the_files_are_erased_once_the_retention_is_over() -> None:
    w = withdrawal.withdraw(THREE, [withdrawal.Departure("h", "b", B)], "2026-12-07T10:00:00Z")
    status = {**THREE, **w.changes, "pendingRevision": {"revision": 4, "replacement": True}}
    at = "2026-12-07T10:05:00Z"
    # A failed replacement is retried: nothing erased yet.
    assert withdrawal.after_replacement(status, status["pendingRevision"], "Failed", at) == {}
    done = withdrawal.after_replacement(status, status["pendingRevision"], "Accepted", at)
    assert done["rebuild"] is None
    after = {**status, **done}
    (record,) = after["withdrawals"]
    assert record["state"] == withdrawal.ERASING and record["replacement"] == 4
    t = dt.datetime(2026, 12, 7, 10, 5, tzinfo=dt.UTC)
    assert withdrawal.due(after, 0, t) == [record]
    assert withdrawal.due(after, 3600, t) == []
    assert withdrawal.due(after, 3600, t + dt.timedelta(hours=1)) == [record]
    assert withdrawal.overdue_seconds(status, t) == 300.0
    assert withdrawal.overdue_seconds(after, t) == 0.0


def test_finished_revisions_record_every_input_their_files_hold() -> None:
    status = {"current": current(1, "a"), "history": []}
    pending = {"revision": 2, "sources": [SB], "incremental": True, "inputs": [B]}
    rejected = composite.Outcome(RevisionState.REJECTED, "regressed", {"inputs": []})
    out = composite.finish_revision(status, pending, rejected, "", "j", 10, "t")
    # A rejected incremental revision holds the revision it was merged into too.
    assert out["history"][0]["inputs"] == [SB, SA]


def test_erasure_prefixes_and_who_keeps_their_files() -> None:
    obj = comp()
    keys = [p.key for p in erasure.revision_prefixes("forge", obj, [2])]
    assert keys == ["composites/forge/f/cu/rev-2/", "verified/composites/forge/f/cu/rev-2/"]
    assert [p.key for p in erasure.contribution_prefixes("forge", "h", "b")] == [
        "contributions/h/b/",
        "verified/contributions/h/b/",
    ]
    assert erasure.leaves_store(None, "forge/f")
    shared = {"spec": {"sharing": {"forges": ["forge/f", "forge/g"]}}}
    assert not erasure.leaves_store(shared, "forge/f")
    assert erasure.leaves_store({"spec": {"sharing": {"forges": []}}}, "forge/f")


class MergingKube(FakeKube):
    """Merge Jobs end as told: each revision's pods report the inputs its config names."""

    def job_pods(self, ns: str, job: JSON) -> list[JSON]:
        name = job["metadata"]["name"]
        revision = name.rsplit("-r", 1)[1]
        secret = next(s for s in reversed(self.secrets) if name in json.dumps(s["metadata"]))
        cfg = json.loads(secret["stringData"]["config.json"])
        inputs = [
            {"namespace": i["namespace"], "name": i["name"], "digest": i["digest"]}
            for i in cfg["inputs"]
        ]
        result = {"artifact": {"digest": f"sha256:m{revision}"}, "inputs": inputs}
        state = {"terminated": {"exitCode": 0, "message": json.dumps(result)}}
        return [
            {
                "metadata": {"name": "p", "creationTimestamp": "t", "labels": {"job-name": name}},
                "status": {"phase": "Succeeded", "containerStatuses": [{"state": state}]},
            }
        ]

    def finish(self, name: str) -> None:
        self.jobs[name]["status"] = {
            "succeeded": 1,
            "conditions": [{"type": "Complete", "status": "True"}],
        }


class ErasingStore(FakeStore):
    def __init__(self) -> None:
        super().__init__()
        self.erased: list[str] = []
        self.receipts: dict[str, JSON] = {}

    def erase(self, prefix: S3Uri) -> list[str]:
        self.erased.append(prefix.key)
        return [prefix.key + "manifest.json"]

    def write_json(self, uri: S3Uri, data: JSON) -> None:
        self.receipts[uri.key] = data

    def uri(self, key: str) -> S3Uri:
        return S3Uri("forge", key)


def test_a_hospital_deletes_its_contribution_and_the_composite_rebuilds_without_it() -> None:
    kube = MergingKube(
        [
            comp(),
            contribution("a", A, "t1"),
            contribution("b", B, "t2"),
            contribution("c", C, "t3"),
        ]
    )
    store = ErasingStore()
    round_(kube, store)  # revision 1 merges a, b and c
    kube.finish("f-merge-r1")
    round_(kube, store)
    st = kube.objects[0]["status"]
    assert st["current"]["revision"] == 1 and st["history"][0]["inputs"] == [SA, SB, SC]
    kube.objects = [o for o in kube.objects if o["metadata"]["name"] != "b"]  # b is deleted
    events = round_(kube, store)
    st = kube.objects[0]["status"]
    assert st["history"][0]["state"] == RevisionState.WITHDRAWN
    assert st["history"][0]["withdrawnReason"] == WR.CONTRIBUTION_DELETED
    assert "current" not in st  # nothing without b to serve meanwhile
    assert st["pendingRevision"]["replacement"] and st["pendingRevision"]["inputs"] == [A, C]
    assert st["phase"] == CompositePhase.MERGING
    assert EventReason.WITHDRAWN in [e[0] for e in events]
    config = kube.secrets[-1]["stringData"]["config.json"]
    assert "contributions/h/b/" not in config and '"integration": "full"' in config
    kube.finish("f-merge-r2")
    events = round_(kube, store)
    st = kube.objects[0]["status"]
    assert st["current"]["revision"] == 2
    assert [i["name"] for i in st["current"]["inputs"]] == ["a", "c"]
    assert "rebuild" not in st
    (record,) = st["withdrawals"]
    assert record["state"] == withdrawal.ERASED and record["replacement"] == 2
    assert store.erased == [
        "composites/forge/f/cu/rev-1/",
        "verified/composites/forge/f/cu/rev-1/",
        "contributions/h/b/",
        "verified/contributions/h/b/",
    ]
    (receipt,) = store.receipts.values()
    assert receipt["input"] == {"namespace": "h", "name": "b", "digest": B}
    assert receipt["contributionFiles"] == "erased"
    assert EventReason.ERASED in [e[0] for e in events]
    # Nothing more happens on the next round.
    before = list(store.erased)
    round_(kube, store)
    assert store.erased == before and not kube.objects[0]["status"].get("pendingRevision")


def test_pull_refuses_a_withdrawn_revision_unless_allowed() -> None:
    from medforge_cli.errors import CliError
    from medforge_cli.pull import _revision

    w = withdrawal.withdraw(THREE, [withdrawal.Departure("h", "b", B)], "2026-12-07T10:00:00Z")
    obj = {"metadata": {"namespace": "forge", "name": "f"}, "status": {**THREE, **w.changes}}
    with pytest.raises(CliError, match=r"withdrawn .*--allow-withdrawn"):
        _revision(obj, 3)
    revision, uri, digest, _ = _revision(obj, 3, allow_withdrawn=True)
    assert (revision, digest) == (3, "sha256:r3") and uri.endswith("/cu/rev-3/")
    assert _revision(obj, None)[0] == 1  # the served fallback


def test_a_revision_recorded_without_its_inputs_is_never_served_again() -> None:
    legacy = {k: v for k, v in entry(1, [SA]).items() if k != "inputs"}
    status = {**THREE, "history": [entry(3, [SA, SB, SC]), entry(2, [SA, SB]), legacy]}
    w = withdrawal.withdraw(status, [withdrawal.Departure("h", "b", B)], "t")
    assert [h["state"] for h in w.changes["history"]] == ["Withdrawn"] * 3
    assert w.changes["current"] is None
    assert w.changes["withdrawals"][0]["revisions"] == [1, 2, 3]
