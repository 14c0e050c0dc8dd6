"""One hospital never stops the others: the significance gate, and isolation driven round after
round through the composite's pure functions (plan, settle, status) with merges that fail
whenever a culprit is among their inputs, faults of the store in between, and a bug that fails
every merge."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

from medforge_common import gate
from medforge_common.api import InputReason, Reason, RevisionState
from medforge_operator import composite, isolation
from tests.unit.test_composite_logic import BASE, comp, contribution

JSON = dict[str, Any]
T0 = "2026-12-03T10:00:00Z"


def digest(i: int) -> str:
    return f"sha256:{i:064x}"


# The gate.


@pytest.mark.parametrize(
    ("before", "after", "samples", "significant"),
    [
        (0.9, 0.6, 200, True),  # a large drop on a large set
        (0.9, 0.8, 40, False),  # 0.1 on 40 images: within what chance does
        (1.0, 0.0, 10, False),  # everything lost, but 5 images per class: too small to gate
        (0.9, 0.88, 10_000, False),  # significant, but within maxRegression
    ],
)
def test_the_gate_acts_on_significant_regressions_only(
    before: float, after: float, samples: int, significant: bool
) -> None:
    rule = gate.Rule()
    prev = {"t": {"accuracy": before, "samples": samples, "classes": 2}}
    new = {"t": {"accuracy": after, "samples": samples, "classes": 2}}
    assert (gate.regressed(prev, new, rule) == {"t"}) is significant
    assert gate.verdict(prev, new, rule)[0] is not significant


def test_corroboration_needs_that_many_tasks() -> None:
    prev = {t: {"accuracy": 0.9, "samples": 200, "classes": 2} for t in "abc"}
    new = {**prev, "a": {"accuracy": 0.5, "samples": 200, "classes": 2}}
    assert not gate.verdict(prev, new, gate.Rule(corroboration=1))[0]
    ok, why = gate.verdict(prev, new, gate.Rule(corroboration=2))
    assert ok and "fewer than gate.corroboration 2" in why
    assert gate.Rule.from_spec({"corroboration": 2, "minImagesPerClass": 4}) == gate.Rule(
        0.05, 4, 2
    )


# Isolation, round after round.

Merge = Callable[[list[str], list[str]], composite.Outcome]


def accepted(inputs: list[str]) -> composite.Outcome:
    """What the merger reports: every input it read (for an incremental revision, the new
    ones; for a full one, all)."""
    return composite.Outcome(
        RevisionState.ACCEPTED,
        "ok",
        {
            "artifact": {"digest": "sha256:r", "files": ["adapter.safetensors"]},
            "inputs": [{"digest": d, "state": "Included"} for d in inputs],
        },
        "s3://forge/r/",
        "job",
    )


def failed(by_inputs: bool) -> composite.Outcome:
    return composite.Outcome(RevisionState.FAILED, "Error: merge failed", by_inputs=by_inputs)


def crashes_with(culprits: set[str]) -> Merge:
    """A merger that fails as a whole (say, out of memory) whenever a culprit is among what it
    reads."""

    def merge(new: list[str], every: list[str]) -> composite.Outcome:
        return failed(True) if culprits & set(every) else accepted(every)

    return merge


def rounds(
    n: int, merge: Merge, limit: int = 60, digests: list[str] | None = None, **spec: Any
) -> tuple[JSON, int]:
    """Contributions c0..c<n-1> (with `digests`, or made-up ones) all Ready at once; revisions
    run until nothing is left to start. (the final status, how many merge Jobs ran)."""
    ds = digests or [digest(i) for i in range(n)]
    contribs = [contribution(f"c{i}", ds[i], since=f"t{i:03d}") for i in range(n)]
    status: JSON = {}
    at, jobs = T0, 0
    for _ in range(limit):
        o = composite.Observation(1, base=BASE, contribs=contribs)
        plan = composite.next_plan(comp(status, **spec), o, at)
        if plan is None:
            break
        new = [c["status"]["artifact"]["digest"] for c in plan.new]
        every = [c["status"]["artifact"]["digest"] for c in plan.all_inputs]
        status = {
            **status,
            "revision": plan.revision,
            "pendingRevision": {
                "revision": plan.revision,
                "digests": new,
                "inputs": every,
                "incremental": spec.get("integration", "incremental") == "incremental"
                and "current" in status,
            },
        }
        jobs += 1
        done = composite.Observation(1, job={}, outcome=merge(new, every), base=BASE)
        done.contribs = contribs
        changes = composite.settle(status, done, 10, at)
        settled = {k: v for k, v in {**status, **changes}.items() if v is not None}
        status = composite.compute_status(status, comp(settled, **spec), done, changes)
        at = composite.later(at, 3601)  # past any backoff
    return status, jobs


def states(status: JSON) -> dict[str, tuple[str, str]]:
    return {i["name"]: (i["state"], i["reason"]) for i in status["inputs"]}


@pytest.mark.parametrize("integration", ["incremental", "full"])
@pytest.mark.parametrize("n", [2, 6, 9])
def test_a_merge_that_fails_with_one_input_isolates_it_and_merges_the_rest(
    n: int, integration: str
) -> None:
    culprit = digest(n // 2)
    status, jobs = rounds(n, crashes_with({culprit}), integration=integration)
    got = states(status)
    assert got.pop(f"c{n // 2}") == ("Excluded", InputReason.ISOLATED_AFTER_FAILURES)
    assert set(got.values()) == {("Included", "Merged")}
    assert "isolation" not in status and "retry" not in status
    # The bound stated in medforge_operator.isolation: two failed attempts, a trial per level
    # on each side, and the culprit's second failure alone.
    assert jobs <= 2 + 2 * math.ceil(math.log2(n)) + 1


@pytest.mark.parametrize("n", [3, 5, 8])
def test_the_bound_holds_wherever_the_culprit_arrives(n: int) -> None:
    for position in range(n):
        status, jobs = rounds(n, crashes_with({digest(position)}))
        assert states(status)[f"c{position}"][1] == InputReason.ISOLATED_AFTER_FAILURES
        assert jobs <= 2 + 2 * math.ceil(math.log2(n)) + 1, (position, jobs)


def test_two_culprits_are_both_isolated() -> None:
    status, _ = rounds(8, crashes_with({digest(1), digest(6)}))
    got = states(status)
    assert got.pop("c1")[1] == got.pop("c6")[1] == InputReason.ISOLATED_AFTER_FAILURES
    assert set(got.values()) == {("Included", "Merged")}


def test_faults_of_the_store_in_between_blame_nobody_else() -> None:
    """Every third Job loses its store (exit 4): retried, never counted against a group."""
    count = [0]
    crash = crashes_with({digest(2)})

    def flaky(new: list[str], every: list[str]) -> composite.Outcome:
        count[0] += 1
        return failed(False) if count[0] % 3 == 0 else crash(new, every)

    status, _ = rounds(5, flaky)
    got = states(status)
    assert got.pop("c2") == ("Excluded", InputReason.ISOLATED_AFTER_FAILURES)
    assert set(got.values()) == {("Included", "Merged")}


def test_a_merge_that_always_fails_blames_nobody() -> None:
    """A bug (or a store down for good): every trial fails, none merges, so nothing proves an
    input guilty; the revision is retried as a fault, with backoff."""
    status, jobs = rounds(4, lambda new, every: failed(True), limit=25)
    assert all(s == ("Pending", "Queued") for s in states(status).values()), states(status)
    assert not status.get("excluded")
    assert status["retry"]["attempt"] == jobs
    ready = next(c for c in status["conditions"] if c["type"] == "Reconciling")
    assert ready["status"] == "True"


def test_a_store_outage_leaves_the_groups_as_they_were() -> None:
    iso = isolation.begin(3, ["a", "b", "c"], Reason.MERGE_FAILED)
    assert iso is not None
    after, blamed = isolation.step(iso, ["a", "b"], isolation.FAULT)
    assert after == iso and blamed == {}


def test_a_regression_with_several_new_inputs_is_split_not_blamed_on_all() -> None:
    """Two newcomers arrive together and the revision regresses (the merger could not tell who
    caused it): the halves are tried, the one that regresses alone is excluded, the other
    merges."""
    bad = digest(1)

    def gate_on(new: list[str], every: list[str]) -> composite.Outcome:
        if bad in every:
            return composite.Outcome(RevisionState.REJECTED, "t regressed", {"inputs": []})
        return accepted(every)

    status, jobs = rounds(2, gate_on)
    assert states(status) == {
        "c0": ("Included", "Merged"),
        "c1": ("Excluded", InputReason.REJECTED_BY_GATE),
    }
    assert jobs == 3  # both, then each alone


def test_a_suspect_withdrawn_during_isolation_is_no_suspect_any_more() -> None:
    iso = isolation.begin(4, ["a", "b", "c"], Reason.MERGE_FAILED)
    assert iso is not None and iso["groups"] == [["a", "b"], ["c"]]
    iso["failures"] = {"c": 1}
    assert isolation.prune(iso, {"a", "b"}) == {**iso, "groups": [["a", "b"]], "failures": {}}
    assert isolation.prune(iso, set()) is None  # nothing left to try: the isolation is over


def test_a_rejection_then_a_broken_merger_blames_nobody() -> None:
    """The gate rejects a revision of four newcomers, then every merge fails (a broken merger
    image): the rejection that started the isolation proves nothing, so nobody is excluded."""
    count = [0]

    def rejected_then_broken(new: list[str], every: list[str]) -> composite.Outcome:
        count[0] += 1
        if count[0] == 1:
            return composite.Outcome(RevisionState.REJECTED, "t regressed", {"inputs": []})
        return failed(True)

    status, _ = rounds(4, rejected_then_broken, limit=30)
    assert not status.get("excluded"), status.get("excluded")


@pytest.mark.parametrize(
    "hostile",
    [
        {"groups": "a"},
        {"groups": [["a"]], "failures": ["a"]},
        {"groups": [[1]]},
        {"groups": [["a"]], "merges": "x"},
    ],
)
def test_a_status_edited_into_another_shape_is_dropped(hostile: JSON) -> None:
    assert isolation.group(hostile) is None and isolation.prune(hostile, {"a"}) is None
    assert isolation.step(hostile, ["a"], isolation.FAILED) == (None, {})
    status = {"isolation": hostile, "retry": {"attempt": "x", "inputFailures": None}}
    pending = {"revision": 2, "digests": ["a"]}
    changes, blamed = composite.after_revision(status, pending, failed(True), {}, T0)
    assert blamed == {} and changes["retry"]["attempt"] == 1


def test_leave_one_out_excludes_one_newcomer_not_everyone_whose_absence_helps() -> None:
    """A drops task x a little (not significant alone), B too; together the drop is significant.
    Leaving either out clears it: only one is excluded (the later arrival on a tie), so a
    member just under the threshold cannot take a newcomer down with it."""
    from medforge_merger import blame

    fig = {"samples": 400, "classes": 2}
    previous = {"x": {"accuracy": 0.90, **fig}}
    together = {"x": {"accuracy": 0.80, **fig}}
    alone = {"x": {"accuracy": 0.88, **fig}}
    entries: list[JSON] = [{"digest": "A"}, {"digest": "B"}]
    out = blame.leave_one_out(previous, gate.Rule(), entries, together, lambda e: alone)
    assert out == {"B": ["x"]}
    # Merged before: never left out.
    old: list[JSON] = [{"digest": "A", "new": False}, {"digest": "B"}]
    assert blame.leave_one_out(previous, gate.Rule(), old, together, lambda e: alone) == {}
