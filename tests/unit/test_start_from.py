"""spec.startFrom in the operator, without a cluster: which revision a contribution may train
from (published to its namespace, accepted, weight-merged, every input consenting), what its
training Job may read (the revision's update, never the tasks file), what the manifest must
name, and how the composite merges it (relative to its parent, stale or refused), down to the
withdrawal cascade."""

from __future__ import annotations

from typing import Any, cast

import pytest

from medforge_common.api import InputReason as IR
from medforge_common.api import Reason, RevisionState
from medforge_operator import branching, contribution, reconcile_contribution, signing
from medforge_operator.bodies import ContributionBody
from medforge_operator.catalog import Catalog
from medforge_operator.composite import branches, mergejob, withdrawal
from medforge_operator.composite.inputs import evaluate_inputs
from medforge_operator.composite.planning import Plan
from medforge_operator.store import ForgeStore
from tests.unit.test_composite_logic import BASE, DIGEST, SETTINGS, FakeKube, FakeStore, comp
from tests.unit.test_composite_logic import contribution as made

JSON = dict[str, Any]
A, B, C = "sha256:" + "1" * 64, "sha256:" + "2" * 64, "sha256:" + "3" * 64
R1, R2 = "sha256:" + "e" * 64, "sha256:" + "f" * 64
FILES = ["adapter.safetensors", "manifest.json", "tasks.safetensors"]
PUBLISH = {"namespaceSelector": {"matchLabels": {"medforge.io/member": "true"}}}


def history(*entries: tuple[int, str, str, list[str]]) -> list[JSON]:
    return [
        {"revision": r, "state": state, "digest": d, "files": FILES, "inputs": inputs}
        for r, state, d, inputs in entries
    ]


def forge(**spec: Any) -> JSON:
    """Revision 2 served (A and B), revision 1 before it (A)."""
    status = {
        "current": {
            "revision": 2,
            "uri": "s3://forge/verified/composites/forge/f/cu/rev-2/",
            "digest": R2,
            "files": FILES,
            "inputs": [{"namespace": "h", "name": "a", "digest": A}],
        },
        "history": history(
            (
                2,
                RevisionState.ACCEPTED,
                R2,
                [withdrawal.source("h", "a", A), withdrawal.source("g", "b", B)],
            ),
            (1, RevisionState.ACCEPTED, R1, [withdrawal.source("h", "a", A)]),
        ),
    }
    return comp(status, **({"publish": PUBLISH} | spec))


def consenting(*_: str) -> bool:
    return True


def resolve(composite: JSON | None, revision: Any = "latest", **kw: Any) -> branching.Parent:
    req = branching.requested({"startFrom": {"composite": "forge/f", "revision": revision}})
    assert req is not None
    return branching.resolve(
        req,
        kw.get("ns", "lab"),
        composite,
        kw.get("labels", {"medforge.io/member": "true"}),
        kw.get("consents", consenting),
        kw.get("base", "clip"),
    )


def test_latest_is_the_served_revision_and_a_number_pins_one() -> None:
    assert resolve(forge()).record() == {"composite": "forge/f", "revision": 2, "digest": R2}
    assert resolve(forge(), 1).record() == {"composite": "forge/f", "revision": 1, "digest": R1}


@pytest.mark.parametrize(
    ("composite", "kw", "reason"),
    [
        (None, {}, Reason.PARENT_NOT_PUBLISHED),  # whether it exists is not told either
        (comp({}, publish=PUBLISH), {}, Reason.PARENT_NOT_FOUND),  # nothing served yet
        (forge(publish=None), {}, Reason.PARENT_NOT_PUBLISHED),  # publishes to no one
        (forge(), {"labels": {"other": "x"}}, Reason.PARENT_NOT_PUBLISHED),
        (forge(), {"consents": lambda ns, *_: ns != "g"}, Reason.PARENT_NOT_CONSENTED),
    ],
)
def test_a_refused_parent_gets_its_reason(composite: JSON | None, kw: JSON, reason: str) -> None:
    with pytest.raises(branching.ParentRefused) as err:
        resolve(composite, **kw)
    assert err.value.reason == reason
    assert "g/b" not in err.value.message  # another hospital's input is never named


def test_rejected_withdrawn_and_mixture_revisions_are_no_parents() -> None:
    for state in (RevisionState.REJECTED, RevisionState.WITHDRAWN, RevisionState.FAILED):
        f = forge()
        f["status"]["history"][1]["state"] = state
        with pytest.raises(branching.ParentRefused) as err:
            resolve(f, 1)
        assert err.value.reason == Reason.PARENT_NOT_ACCEPTED
    f = forge()
    f["status"]["history"][0]["files"] = ["mixture.safetensors", "manifest.json"]
    with pytest.raises(branching.ParentRefused) as err:
        resolve(f)
    assert err.value.reason == Reason.PARENT_IS_MIXTURE
    with pytest.raises(ValueError, match=r"spec\.baseModel\.name"):
        resolve(forge(), base="other")
    with pytest.raises(ValueError, match=r"startFrom\.revision"):
        branching.requested({"startFrom": {"composite": "forge/f", "revision": 0}})


def test_consent_is_the_hospitals_spec_sharing_publish() -> None:
    c = made("a", A)
    assert not branching.consented(c, A) and not branching.consented(None, A)
    c["spec"]["sharing"]["publish"] = True
    assert branching.consented(c, A)


def test_the_training_job_reads_the_update_never_the_tasks_file() -> None:
    obj = made("b", B, ns="lab") | {
        "spec": {"task": {"name": "t"}, "dataset": {"uri": "s3://data/b/"}}
    }
    obj["metadata"]["generation"] = 1
    parent = resolve(forge())
    out = contribution.output_prefix("forge", obj, 1)
    plan = contribution.train_plan(obj, BASE, out, parent)
    start = plan["startFrom"]
    assert [f["name"] for f in start["files"]] == ["manifest.json", "adapter.safetensors"]
    assert (
        start["files"][1]["get"]
        == "s3://forge/verified/composites/forge/f/cu/rev-2/adapter.safetensors"
    )
    grant = contribution.training_grant("forge", obj, BASE, parent)
    signing.check(plan, grant)  # everything asked for lies inside the grant
    tasks = parent.prefix("forge").join("tasks.safetensors")
    assert not grant.allows("get", tasks)
    without = contribution.training_grant("forge", obj, BASE)
    with pytest.raises(signing.SigningRefused):
        signing.check(plan, without)


def test_the_manifest_must_name_the_revision_the_job_was_given() -> None:
    spec = {"task": {"name": "t", "classes": ["x", "y"]}}
    meta = {"task": "t", "classes": ["x", "y"]}
    given = {"composite": "forge/f", "revision": 2, "digest": R2}
    assert contribution.manifest_matches_spec(meta | {"parent": given}, spec, [], given) is None
    assert "meta.parent" in str(contribution.manifest_matches_spec(meta, spec, [], given))
    other = given | {"revision": 1}
    assert "meta.parent" in str(
        contribution.manifest_matches_spec(meta | {"parent": other}, spec, [], given)
    )
    assert "meta.parent" in str(
        contribution.manifest_matches_spec(meta | {"parent": given}, spec, [])
    )


def branch(name: str, digest: str, revision: int, parent_digest: str = R1, ns: str = "lab") -> JSON:
    c = made(name, digest, ns=ns)
    c["spec"]["sharing"]["forges"] = ["forge/f"]
    c["status"]["artifact"]["parent"] = {
        "composite": "forge/f",
        "revision": revision,
        "digest": parent_digest,
    }
    return c


def test_the_composite_merges_a_branch_relative_to_its_parent_and_records_staleness() -> None:
    f = forge(branches={"maxStaleness": 1, "rank": 8})
    fresh, stale = branch("fresh", C, 2, R2), branch("stale", B, 1)
    inputs, candidates = evaluate_inputs(f, [fresh, stale], DIGEST)
    assert [c["metadata"]["name"] for c in candidates] == ["fresh", "stale"]
    plan = mergejob.merge_plan(
        f, Plan(3, candidates, candidates), BASE, mergejob.output_prefix("forge", f, 3), "forge"
    )
    parents = {i["name"]: i.get("parent") for i in plan["inputs"]}
    assert parents == {
        "fresh": {"revision": 2, "digest": R2, "stale": 0},
        "stale": {"revision": 1, "digest": R1, "stale": 1},
    }
    assert plan["branches"] == {"rank": 8}
    too_old = forge(branches={"maxStaleness": 0})
    inputs, candidates = evaluate_inputs(too_old, [fresh, stale], DIGEST)
    assert {i["name"]: i["reason"] for i in inputs} == {
        "fresh": IR.QUEUED,
        "stale": IR.PARENT_TOO_STALE,
    }


def test_other_composites_and_mixtures_never_merge_a_branch() -> None:
    elsewhere = branch("x", C, 2, R2)
    elsewhere["status"]["artifact"]["parent"]["composite"] = "forge/other"
    inputs, _ = evaluate_inputs(forge(), [elsewhere], DIGEST)
    assert inputs[0]["reason"] == IR.PARENT_ELSEWHERE
    inputs, _ = evaluate_inputs(
        forge(strategy={"type": "mixture"}), [branch("y", C, 2, R2)], DIGEST
    )
    assert inputs[0]["reason"] == IR.PARENT_IS_MIXTURE


def test_a_withdrawal_cascades_to_the_branches_of_the_revisions_it_withdraws() -> None:
    """A leaves: revisions 1 and 2 held it; the branch trained from revision 1 leaves the
    replacement too (cascade), or stays, rebased, with cascade false."""
    status = forge()["status"]
    status["current"]["inputs"] = [
        {"namespace": "h", "name": "a", "digest": A},
        {"namespace": "g", "name": "b", "digest": B},
        {
            "namespace": "lab",
            "name": "c",
            "digest": C,
            "parent": {"revision": 1, "digest": R1, "stale": 1},
        },
    ]
    gone = [withdrawal.Departure("h", "a", A)]
    w = withdrawal.withdraw(status, gone, "t9")
    assert w.changes["rebuild"]["inputs"] == [B]
    assert [i["name"] for i in w.cascaded] == ["c"]
    assert w.changes["excluded"] == {C: IR.PARENT_WITHDRAWN}  # stays out past the history
    kept = withdrawal.withdraw(status, gone, "t9", cascade=False)
    assert kept.changes["rebuild"]["inputs"] == [B, C] and kept.cascaded == []
    # And the branch is refused as an input while its parent stays withdrawn.
    after = forge() | {"status": {**status, "history": w.changes["history"]}}
    assert branches.refusal(after, branch("c", C, 1)) == IR.PARENT_WITHDRAWN
    after["spec"]["withdrawal"] = {"cascade": False}
    assert branches.refusal(after, branch("c", C, 1)) is None


def test_a_contributions_round_records_the_revision_or_says_why_not() -> None:
    obj: JSON = {
        "kind": "LoRAContribution",
        "metadata": {"namespace": "lab", "name": "b", "generation": 1, "uid": "ub"},
        "spec": {
            "baseModel": {"name": "clip"},
            "task": {"name": "t", "classes": ["x", "y"]},
            "dataset": {"uri": "s3://data/b/"},
            "startFrom": {"composite": "forge/f", "revision": "latest"},
            "sharing": {"forges": ["forge/f"]},
        },
    }
    a = made("a", A)
    a["spec"]["sharing"]["publish"] = True
    f = forge()
    kube = FakeKube([f, a])
    k, st = kube, cast(ForgeStore, FakeStore())
    new = reconcile_contribution.reconcile(
        cast(ContributionBody, obj), k, st, SETTINGS, lambda *_: None, Catalog(k, st, SETTINGS)
    )
    ready = next(c for c in new["conditions"] if c["type"] == "Ready")
    # g/b (an input of revision 2) is not found: it consents to nothing.
    assert ready["reason"] == Reason.PARENT_NOT_CONSENTED and not kube.created
    obj["spec"]["startFrom"]["revision"] = 1  # revision 1 holds h/a only, which consents
    new = reconcile_contribution.reconcile(
        cast(ContributionBody, obj), k, st, SETTINGS, lambda *_: None, Catalog(k, st, SETTINGS)
    )
    assert new["startFrom"] == {"composite": "forge/f", "revision": 1, "digest": R1}
    assert [j["metadata"]["name"] for j in kube.created] == ["b-train-g1"]


def test_what_the_history_no_longer_shows_is_not_forgotten() -> None:
    """The history keeps spec.historyLimit entries: a parent older than it counts as stale by
    every revision since, a withdrawal record still refuses it, a running Job's recorded
    revision is still signed, and a revision of an earlier composite of the same name is
    refused."""
    status = forge()["status"] | {"current": {"revision": 9, "digest": R2, "files": FILES}}
    status["history"] = history(
        (9, RevisionState.ACCEPTED, R2, []), (8, RevisionState.REJECTED, R1, [])
    )
    assert branches.staleness(status, 2) == 1 + 5  # 9 accepted, 3 to 7 trimmed
    assert branches.staleness(status, 9) == 0
    gone = forge() | {"status": status | {"withdrawals": [{"revisions": [2]}]}}
    assert branches.refusal(gone, branch("x", C, 2, R1)) == IR.PARENT_WITHDRAWN
    recorded = {"composite": "forge/f", "revision": 3, "digest": R1}
    req = branching.Request("forge", "f", 3)
    f = forge() | {"status": status}
    parent = branching.resolve(
        req, "lab", f, {"medforge.io/member": "true"}, consenting, "clip", recorded
    )
    assert parent.record() == recorded and parent.given() == [
        "manifest.json",
        "adapter.safetensors",
    ]
    with pytest.raises(branching.ParentRefused) as err:
        branching.resolve(req, "lab", gone | {"status": gone["status"] | {"withdrawals": [{"revisions": [3]}]}},
                          {"medforge.io/member": "true"}, consenting, "clip", recorded)  # fmt: skip
    assert err.value.reason == Reason.PARENT_NOT_ACCEPTED
    other = branch("y", C, 9, "sha256:" + "9" * 64)  # revision 9 of a composite made again
    assert branches.refusal(f, other) == IR.PARENT_ELSEWHERE
