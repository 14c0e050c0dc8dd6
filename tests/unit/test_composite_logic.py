"""The CompositeModel's round, observation to status: table-driven tests of the pure functions
(settling a revision, planning the next, problems, conditions) and reconcile rounds against
fake clients (a store outage, a Job that already exists, a contribution's older Jobs)."""

from __future__ import annotations

from typing import Any, cast

import pytest
from kubernetes.client.exceptions import ApiException

from medforge_common.api import CompositePhase, InputReason, Reason, RevisionState
from medforge_common.manifest import Manifest
from medforge_common.uris import S3Uri
from medforge_operator import basemodel, composite, reconcile_composite, reconcile_contribution
from medforge_operator.bodies import CompositeBody, ContributionBody
from medforge_operator.catalog import Catalog
from medforge_operator.settings import Settings
from medforge_operator.store import ForgeStore, StoreUnreachable

JSON = dict[str, Any]
DIGEST = "sha256:" + "a" * 64
BASE = basemodel.Resolved("clip", DIGEST, S3Uri("forge", "base-models/clip/"), ("c.json",))
SETTINGS = Settings("http://s3", "forge", "ak", "sk", forge_namespaces=("forge",))


def contribution(name: str, digest: str, since: str = "t1", ns: str = "h") -> JSON:
    return {
        "kind": "LoRAContribution",
        "metadata": {"namespace": ns, "name": name, "generation": 1, "uid": f"u-{name}"},
        "spec": {"sharing": {"forges": ["forge/f"]}},
        "status": {
            "observedGeneration": 1,
            "phase": "Succeeded",
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": since}],
            "artifact": {
                "digest": digest,
                "baseModelDigest": DIGEST,
                "uri": f"s3://forge/verified/contributions/{ns}/{name}/u-{name}/"
                f"{digest.removeprefix('sha256:')}/",
                "files": ["adapter.safetensors"],
            },
        },
    }


def comp(status: JSON | None = None, **spec: Any) -> JSON:
    return {
        "kind": "CompositeModel",
        "metadata": {"namespace": "forge", "name": "f", "generation": 1, "uid": "cu"},
        "spec": {"baseModel": {"name": "clip"}, "historyLimit": 2, **spec},
        "status": status or {},
    }


ACCEPTED = composite.Outcome(
    RevisionState.ACCEPTED,
    "ok",
    {
        "artifact": {"digest": "sha256:r1", "files": ["adapter.safetensors"]},
        "inputs": [{"namespace": "h", "name": "a", "digest": "sha256:1", "state": "Included"}],
        "score": 0.9,
    },
    "s3://forge/composites/forge/f/rev-1/",
    "f-merge-r1",
)
PENDING = {
    "pendingRevision": {"revision": 1, "digests": ["sha256:1"], "jobUid": "u"},
    "revision": 1,
}


@pytest.mark.parametrize(
    ("status", "observation", "expected"),
    [
        # Nothing pending: nothing to settle.
        ({}, composite.Observation(1), {}),
        # The Job runs: still pending.
        (PENDING, composite.Observation(1, job={"status": {"active": 1}}), {}),
        # The Job is gone before it ended: that revision starts over.
        (PENDING, composite.Observation(1, job=None), {"pendingRevision": None}),
        # The upload cannot be checked: still pending.
        (
            PENDING,
            composite.Observation(
                1, job={}, outcome=composite.Outcome(Reason.STORE_UNREACHABLE, "down")
            ),
            {},
        ),
    ],
)
def test_settle_keeps_or_drops_the_pending_revision(
    status: JSON, observation: composite.Observation, expected: JSON
) -> None:
    assert composite.settle(status, observation, 10, T0) == expected


T0 = "2026-11-28T10:00:00Z"


def test_settle_an_accepted_and_a_failed_revision() -> None:
    done = composite.settle(PENDING, composite.Observation(1, job={}, outcome=ACCEPTED), 2, T0)
    assert done["pendingRevision"] is None and done["current"]["revision"] == 1
    assert done["current"]["inputs"][0]["digest"] == "sha256:1"
    assert done["history"][0]["state"] == RevisionState.ACCEPTED and done["retry"] is None
    # A Job that failed as a whole is a fault: nothing is excluded, the revision is retried.
    failed = composite.Outcome(RevisionState.FAILED, "OOMKilled", uri="u", job_name="j")
    done = composite.settle(PENDING, composite.Observation(1, job={}, outcome=failed), 2, T0)
    assert done["excluded"] == {} and "current" not in done
    assert done["retry"] == {
        "attempt": 1,
        "inputFailures": 0,  # nothing says its inputs caused it
        "notBefore": "2026-11-28T10:00:30Z",
    }
    again = {**PENDING, "retry": done["retry"]}
    done = composite.settle(again, composite.Observation(1, job={}, outcome=failed), 2, T0)
    assert done["retry"] == {"attempt": 2, "inputFailures": 0, "notBefore": "2026-11-28T10:01:00Z"}
    assert composite.retry_delay(20) == composite.RETRY_MAX_SECONDS
    # A gate rejection of a single new input is a verdict on it: it is excluded.
    rejected = composite.Outcome(RevisionState.REJECTED, "x regressed", uri="u", job_name="j")
    done = composite.settle(PENDING, composite.Observation(1, job={}, outcome=rejected), 2, T0)
    assert done["excluded"] == {"sha256:1": InputReason.REJECTED_BY_GATE}
    # The history keeps spec.historyLimit entries, newest first.
    status = {**PENDING, "history": [{"revision": 0}, {"revision": -1}]}
    done = composite.settle(status, composite.Observation(1, job={}, outcome=failed), 2, T0)
    assert [h["revision"] for h in done["history"]] == [1, 0]


def test_incremental_revisions_add_to_the_current_inputs() -> None:
    status = {
        **PENDING,
        "pendingRevision": {"revision": 2, "digests": ["sha256:2"], "incremental": True},
        "current": {"revision": 1, "inputs": [{"digest": "sha256:1"}]},
    }
    outcome = composite.Outcome(
        RevisionState.ACCEPTED,
        "ok",
        {"artifact": {"digest": "sha256:r2"}, "inputs": [{"digest": "sha256:2"}]},
    )
    done = composite.settle(status, composite.Observation(1, job={}, outcome=outcome), 5, T0)
    assert [i["digest"] for i in done["current"]["inputs"]] == ["sha256:1", "sha256:2"]


@pytest.mark.parametrize(
    ("observation", "status", "plans"),
    [
        (composite.Observation(1, base=BASE), {}, True),
        (composite.Observation(1, base=None, base_problem=("BaseModelNotReady", "x")), {}, False),
        (composite.Observation(1, base=BASE, job={"status": {"active": 1}}), PENDING, False),
        # A failed revision is retried once its backoff has passed, not before.
        (composite.Observation(1, base=BASE), {"history": [{"state": "Failed"}]}, True),
        (
            composite.Observation(1, base=BASE),
            {"retry": {"attempt": 1, "notBefore": "2026-11-28T10:00:30Z"}},
            False,
        ),
        (
            composite.Observation(1, base=BASE),
            {"retry": {"attempt": 1, "notBefore": "2026-11-28T09:59:59Z"}},
            True,
        ),
    ],
)
def test_next_plan(observation: composite.Observation, status: JSON, plans: bool) -> None:
    observation.contribs = [contribution("a", "sha256:1")]
    assert (composite.next_plan(comp(status), observation, T0) is not None) == plans


@pytest.mark.parametrize(
    ("status", "observation", "paused", "phase", "ready_reason"),
    [
        (
            {},
            composite.Observation(1, base=BASE),
            False,
            CompositePhase.WAITING,
            "WaitingForContributions",
        ),
        ({}, composite.Observation(1, base=BASE), True, CompositePhase.PAUSED, "Paused"),
        (
            {"current": {"revision": 1}},
            composite.Observation(1, base=BASE),
            False,
            CompositePhase.READY,
            "RevisionReady",
        ),
        (
            {"current": {"revision": 1}, **PENDING},
            composite.Observation(1, base=BASE, job={"status": {"active": 1}}),
            False,
            CompositePhase.MERGING,
            "Serving",
        ),
        (
            PENDING,
            composite.Observation(1, base=BASE, job={"status": {"active": 1}}),
            False,
            CompositePhase.MERGING,
            "Merging",
        ),
        (
            {"history": [{"revision": 1, "state": "Failed", "message": "boom"}]},
            composite.Observation(1, base=BASE),
            False,
            CompositePhase.FAILED,
            "MergeFailed",
        ),
        (
            {
                "history": [{"revision": 1, "state": "Failed", "message": "OOMKilled"}],
                "retry": {"attempt": 1, "notBefore": "2026-11-28T10:00:30Z"},
            },
            composite.Observation(1, base=BASE),
            False,
            CompositePhase.WAITING,
            "MergeFailed",
        ),
        (
            {},
            composite.Observation(1, base_problem=("BaseModelNotFound", "no BaseModel")),
            False,
            CompositePhase.FAILED,
            "BaseModelNotFound",
        ),
        (
            {},
            composite.Observation(1, base_problem=("BaseModelNotReady", "being verified")),
            False,
            CompositePhase.WAITING,
            "BaseModelNotReady",
        ),
        (
            {"current": {"revision": 1}, **PENDING},
            composite.Observation(
                1, base=BASE, job={}, outcome=composite.Outcome(Reason.STORE_UNREACHABLE, "down")
            ),
            False,
            CompositePhase.READY,
            "StoreUnreachable",
        ),
    ],
)
def test_every_branch_of_the_conditions(
    status: JSON, observation: composite.Observation, paused: bool, phase: str, ready_reason: str
) -> None:
    new = composite.compute_status({}, comp(status, paused=paused), observation, {})
    ready = next(c for c in new["conditions"] if c["type"] == "Ready")
    assert (new["phase"], ready["reason"]) == (phase, ready_reason)
    stalled = next(c for c in new["conditions"] if c["type"] == "Stalled")
    assert (stalled["status"] == "True") == (
        phase == CompositePhase.FAILED or ready_reason in ("StoreUnreachable", "BaseModelNotReady")
    )
    if "retry" in status:  # a fault being retried is in progress, with when it retries
        reconciling = next(c for c in new["conditions"] if c["type"] == "Reconciling")
        assert reconciling["status"] == "True" and "retrying at" in reconciling["message"]


def test_rejected_revision_keeps_serving_and_says_why() -> None:
    status = {
        "current": {"revision": 1},
        "history": [{"revision": 2, "state": "Rejected", "message": "task x regressed"}],
    }
    new = composite.compute_status({}, comp(status), composite.Observation(1, base=BASE), {})
    accepted = next(c for c in new["conditions"] if c["type"] == "Accepted")
    assert new["phase"] == CompositePhase.READY
    assert (accepted["status"], accepted["reason"]) == ("False", "RegressionOverGate")


# ----- reconcile rounds against fake clients -----


class FakeKube:
    def __init__(self, objects: list[JSON], jobs: dict[str, JSON] | None = None) -> None:
        self.objects = objects
        self.jobs = jobs or {}
        self.created: list[JSON] = []
        self.deleted: list[str] = []
        self.statuses: list[JSON] = []
        self.secrets: list[JSON] = []
        self.base_digest = DIGEST

    def get_object(self, plural: str, ns: str, name: str) -> JSON | None:
        kind = {"compositemodels": "f", "basemodels": "clip"}.get(plural)
        if plural == "basemodels":
            return {
                "metadata": {"name": "clip", "generation": 1},
                "spec": {},
                "status": {
                    "phase": "Ready",
                    "observedGeneration": 1,
                    "digest": self.base_digest,
                    "uri": "s3://forge/base-models/clip/",
                    "files": ["c.json"],
                },
            }
        return next(
            (o for o in self.objects if o["metadata"]["name"] == name and kind in (None, name)),
            None,
        )

    def list_objects(self, plural: str, ns: str | None = None, selector: str = "") -> list[JSON]:
        if plural == "privacybudgets":
            return [o for o in self.objects if o.get("kind") == "PrivacyBudget"]
        return [o for o in self.objects if "sharing" in o.get("spec", {})]

    def iter_objects(self, plural: str, ns: str | None = None, selector: str = "") -> Any:
        return iter(self.list_objects(plural, ns, selector))

    def namespace_labels(self, name: str) -> dict[str, str]:
        return {"medforge.io/member": "true"}

    def get_job(self, ns: str, name: str) -> JSON | None:
        return self.jobs.get(name)

    def create_job(self, job: JSON) -> tuple[JSON, bool]:
        name = job["metadata"]["name"]
        if name in self.jobs:  # the API's 409, answered with the Job that exists
            return self.jobs[name], False
        job = {**job, "metadata": {**job["metadata"], "uid": f"uid-{name}"}}
        self.created.append(job)
        self.jobs[name] = job
        return job, True

    def list_jobs(self, ns: str, selector: str) -> list[JSON]:
        return list(self.jobs.values())

    def delete_job(self, ns: str, name: str) -> None:
        self.deleted.append(name)
        self.jobs.pop(name, None)

    def job_pods(self, ns: str, job: JSON) -> list[JSON]:
        job_name = job["metadata"]["name"]
        result = (
            '{"artifact": {"digest": "sha256:m"}, '
            '"inputs": [{"namespace": "h", "name": "a", "digest": "sha256:1"}]}'
        )
        state = {"terminated": {"exitCode": 0, "message": result}}
        return [
            {
                "metadata": {
                    "name": "p",
                    "creationTimestamp": "t",
                    "labels": {"job-name": job_name},
                },
                "status": {"phase": "Succeeded", "containerStatuses": [{"state": state}]},
            }
        ]

    def patch_status(
        self, plural: str, ns: str, name: str, status: JSON, resource_version: str | None = None
    ) -> None:
        """A merge patch of status, as the API server applies it (409 on a stale version)."""
        for obj in self.objects:
            if obj["metadata"]["name"] == name:
                current = obj["metadata"].get("resourceVersion")
                if resource_version and current and resource_version != current:
                    raise ApiException(status=409, reason="Conflict")
                obj["metadata"]["resourceVersion"] = str(int(current or 0) + 1)
        self.statuses.append(status)
        for obj in self.objects:
            if obj["metadata"]["name"] == name:
                merged = {**(obj.get("status") or {}), **status}
                obj["status"] = {k: v for k, v in merged.items() if v is not None}

    def apply_secret(self, secret: JSON) -> None:
        self.secrets.append(secret)


class FakeStore:
    def __init__(self, reachable: bool = True) -> None:
        self.s = SETTINGS
        self.bucket = "forge"
        self.reachable = reachable

    def presign_get(self, uri: S3Uri, expires: int | None = None) -> str:
        return f"https://s3/{uri.key}?sig"

    def presign_put(self, uri: S3Uri, expires: int | None = None) -> str:
        return f"https://s3/{uri.key}?put"

    def verify_copy(self, upload: S3Uri, verified: S3Uri, digest: str) -> Manifest:
        if not self.reachable:
            raise StoreUnreachable("the forge store at http://s3 is unreachable")
        self.copied = (upload, verified)
        return Manifest("composite", DIGEST, [])


def round_(kube: FakeKube, store: FakeStore) -> list[tuple[str, str]]:
    events: list[tuple[str, str]] = []
    k, st = kube, cast(ForgeStore, store)
    reconcile_composite.reconcile(
        cast(CompositeBody, comp()),
        k,
        st,
        SETTINGS,
        lambda _o, _t, reason, msg: events.append((reason, msg)),
        Catalog(k, st, SETTINGS),
    )
    return events


def test_a_round_starts_a_revision_and_writes_its_config() -> None:
    kube = FakeKube([comp(), contribution("a", "sha256:1")])
    events = round_(kube, FakeStore())
    assert [j["metadata"]["name"] for j in kube.created] == ["f-merge-r1"]
    assert kube.statuses[-1]["pendingRevision"]["digests"] == ["sha256:1"]
    assert kube.statuses[-1]["phase"] == CompositePhase.MERGING
    assert kube.secrets and "sig" in kube.secrets[0]["stringData"]["config.json"]
    assert events[-1][0] == "RevisionStarted"


def test_a_job_that_already_exists_unrecorded_is_never_taken() -> None:
    """The API's 409 on create: a look-alike made first (a controller reference to this
    composite and our labels are anyone's to write), or ours from a round cut short before its
    status was written. It never gets a config: it is deleted, and the next round creates the
    revision's Job of record."""
    existing = {
        "metadata": {
            "name": "f-merge-r1",
            "uid": "old",
            "ownerReferences": [{"uid": "cu", "controller": True}],
        },
        "spec": {},
        "status": {"active": 1, "startTime": "2026-01-01T00:00:00Z"},
    }
    kube = FakeKube([comp(), contribution("a", "sha256:1")], {"f-merge-r1": existing})
    round_(kube, FakeStore())
    assert kube.created == [] and kube.deleted == ["f-merge-r1"] and kube.secrets == []
    assert "pendingRevision" not in kube.objects[0]["status"]
    stalled = next(c for c in kube.statuses[-1]["conditions"] if c["type"] == "Stalled")
    assert stalled["reason"] == "JobNotRecorded"
    round_(kube, FakeStore())
    assert [j["metadata"]["name"] for j in kube.created] == ["f-merge-r1"]
    pending = kube.objects[0]["status"]["pendingRevision"]
    assert pending["jobUid"] == "uid-f-merge-r1" and pending["revision"] == 1


def test_a_store_outage_leaves_the_revision_pending() -> None:
    done: JSON = {
        "metadata": {
            "name": "f-merge-r1",
            "uid": "u",
            "ownerReferences": [{"uid": "cu", "controller": True}],
        },
        "status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]},
    }
    kube = FakeKube([comp(PENDING), contribution("a", "sha256:1")], {"f-merge-r1": done})
    kube.objects[0]["status"] = dict(PENDING)
    events = round_(kube, FakeStore(reachable=False))
    st = kube.statuses[-1]
    assert st["pendingRevision"]["revision"] == 1 and "excluded" not in st
    stalled = next(c for c in st["conditions"] if c["type"] == "Stalled")
    assert stalled["reason"] == "StoreUnreachable" and kube.created == []
    assert events == []
    # The store is back: the revision is accepted and its input included.
    round_(kube, FakeStore())
    st = kube.objects[0]["status"]
    assert "pendingRevision" not in st and st["current"]["revision"] == 1
    assert st["history"][0]["state"] == RevisionState.ACCEPTED
    assert st["inputs"][0]["reason"] == InputReason.MERGED


def test_a_spec_change_retires_the_older_jobs_of_a_contribution() -> None:
    obj = contribution("a", "sha256:1")
    obj["metadata"]["generation"] = 2
    obj["metadata"]["uid"] = "u"
    obj["spec"] |= {
        "baseModel": {"name": "clip"},
        "task": {"name": "t", "classes": ["x", "y"]},
        "dataset": {"uri": "s3://hospital-data/x/"},
    }
    obj["status"] = {"observedGeneration": 1, "phase": "Succeeded"}
    older = {
        "metadata": {"name": "a-train-g1", "ownerReferences": [{"uid": "u", "controller": True}]}
    }
    kube = FakeKube([obj], {"a-train-g1": older})
    k, st = kube, cast(ForgeStore, FakeStore())
    events: list[str] = []
    new = reconcile_contribution.reconcile(
        cast(ContributionBody, obj),
        k,
        st,
        SETTINGS,
        lambda _o, _t, r, _m: events.append(r),
        Catalog(k, st, SETTINGS),
    )
    assert kube.deleted == ["a-train-g1"] and "RetiredJob" in events
    assert [j["metadata"]["name"] for j in kube.created] == ["a-train-g2"]
    assert new["observedGeneration"] == 2 and new["phase"] == "Pending"


def test_status_stays_bounded_with_500_failing_contributions() -> None:
    import json

    failing = []
    for i in range(500):
        c = contribution(f"site-{i:03d}", f"sha256:{i:064x}")
        c["status"]["phase"] = "Failed"
        c["status"]["conditions"][0] |= {
            "status": "False",
            "reason": "BackoffLimitExceeded",
            "message": "x" * 4000,  # a long failure line of the hospital's own
        }
        failing.append(c)
    status = {"excluded": {f"sha256:{i:064x}": "ExcludedByMerger" for i in range(1000)}}
    o = composite.Observation(1, base=BASE, contribs=failing)
    new = composite.compute_status({}, comp(status), o, {})
    size = len(json.dumps(new))
    assert size < 256 * 1024, size
    assert new["inputCounts"] == {"Included": 0, "Excluded": 500, "Pending": 0}
    assert len(new["inputs"]) == composite.INPUTS_SHOWN and new["inputsOmitted"] == 300
    assert "xxxx" not in json.dumps(new)  # no copied text from other objects
    assert len(new["excluded"]) == 500  # only digests some contribution still carries


def test_two_writers_never_lose_a_pending_revision() -> None:
    """A round that read the composite before another writer changed it gets 409 from the API
    server and writes nothing; its retry reads what is there now."""
    kube = FakeKube([comp(), contribution("a", "sha256:1")])
    kube.objects[0]["metadata"]["resourceVersion"] = "5"
    stale = json_copy(kube.objects[0])
    round_(kube, FakeStore())  # the leader starts revision 1 (version 5 -> 6)
    assert kube.objects[0]["status"]["pendingRevision"]["revision"] == 1
    with pytest.raises(ApiException):
        # a second writer, on the copy it read at version 5, would drop pendingRevision
        reconcile_composite._write(stale, kube, {"phase": "Waiting", "revision": 0})
    assert kube.objects[0]["status"]["pendingRevision"]["revision"] == 1


def json_copy(obj: JSON) -> JSON:
    import json

    out: JSON = json.loads(json.dumps(obj))
    return out


def test_a_job_of_the_right_name_but_another_owner_is_never_adopted() -> None:
    """A contribution deleted and created again under its name finds its predecessor's Job:
    it is ours, so it goes; a Job of that name that MedForge did not make is reported."""
    obj = contribution("a", "sha256:1")
    obj["metadata"] |= {"uid": "new-uid"}
    obj["spec"] |= {
        "baseModel": {"name": "clip"},
        "task": {"name": "t", "classes": ["x", "y"]},
        "dataset": {"uri": "s3://hospital-data/x/"},
    }
    obj["status"] = {}
    stale = {
        "metadata": {
            "name": "a-train-g1",
            "labels": {"app.kubernetes.io/managed-by": "medforge-operator"},
            "ownerReferences": [{"uid": "old-uid", "controller": True}],
        },
        "status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]},
    }
    kube = FakeKube([obj], {"a-train-g1": stale})
    k, st = kube, cast(ForgeStore, FakeStore())
    new = reconcile_contribution.reconcile(
        cast(ContributionBody, obj), k, st, SETTINGS, lambda *_: None, Catalog(k, st, SETTINGS)
    )
    assert kube.deleted == ["a-train-g1"] and new["phase"] == "Pending"  # never its result
    foreign = {"metadata": {"name": "a-train-g1", "ownerReferences": []}, "status": {}}
    kube = FakeKube([obj], {"a-train-g1": foreign})
    k = kube
    new = reconcile_contribution.reconcile(
        cast(ContributionBody, obj), k, st, SETTINGS, lambda *_: None, Catalog(k, st, SETTINGS)
    )
    stalled = next(c for c in new["conditions"] if c["type"] == "Stalled")
    assert kube.deleted == [] and stalled["reason"] == "JobNameTaken"


def test_a_queued_job_built_for_another_base_model_is_replaced() -> None:
    """A Job still waiting in its queue is compared with the plan it would get now: unchanged,
    it stays (every round); built for a BaseModel digest that is no longer the verified one,
    it is replaced. A Job that started is never touched."""
    obj = contribution("a", "sha256:1")
    obj["metadata"] |= {"uid": "u1"}
    obj["spec"] |= {
        "baseModel": {"name": "clip"},
        "task": {"name": "t", "classes": ["x", "y"]},
        "dataset": {"uri": "s3://hospital-data/x/"},
        "resources": {"queueName": "gpu"},
    }
    obj["status"] = {}
    kube = FakeKube([obj])
    k, st = kube, cast(ForgeStore, FakeStore())

    def round_once() -> JSON:
        return reconcile_contribution.reconcile(
            cast(ContributionBody, obj), k, st, SETTINGS, lambda *_: None, Catalog(k, st, SETTINGS)
        )

    obj["status"] = round_once()  # creates the queued Job
    assert list(kube.jobs) == ["a-train-g1"] and kube.jobs["a-train-g1"]["spec"]["suspend"]
    for _ in range(3):
        obj["status"] = round_once()
    assert kube.deleted == []  # the same plan: left alone
    # What the Job says of its plan is never read: rewriting its annotations changes nothing.
    kube.jobs["a-train-g1"]["metadata"]["annotations"]["medforge.io/job-plan"] = "{}"
    obj["status"] = round_once()
    assert kube.deleted == []
    kube.base_digest = "sha256:" + "e" * 64  # the BaseModel was registered again
    obj["status"] = round_once()
    assert kube.deleted == ["a-train-g1"]
