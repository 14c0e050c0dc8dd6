"""The domain metrics: computed from the observed objects at scrape time, so a deleted object's
series disappear, a standby exports none, and hostile status values never become samples."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from medforge_operator import BASEMODELS, COMPOSITES, CONTRIBUTIONS
from medforge_operator.domain_metrics import DomainCollector, families, parse_time
from medforge_operator.observed import ObservedObjects

JSON = dict[str, Any]


def contribution(name: str, phase: str, ns: str = "hospital-a", **status: Any) -> JSON:
    return {
        "metadata": {"name": name, "namespace": ns, "generation": 1},
        "spec": {"task": {"name": "chest-xray"}},
        "status": {"phase": phase, **status},
    }


def composite(name: str, **status: Any) -> JSON:
    return {
        "metadata": {
            "name": name,
            "namespace": "forge",
            "creationTimestamp": "2026-11-29T00:00:00Z",
        },
        "spec": {},
        "status": status,
    }


def samples(
    observed: ObservedObjects, leading: bool = True
) -> dict[tuple[str, tuple[Any, ...]], float]:
    registry = CollectorRegistry()
    registry.register(DomainCollector(observed, lambda: leading))
    out = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(
    got: dict[tuple[str, tuple[Any, ...]], float], metric_name: str, /, **labels: str
) -> float | None:
    return got.get((metric_name, tuple(sorted(labels.items()))))


def test_contributions_by_phase_stalled_and_trainer_figures() -> None:
    observed = ObservedObjects()
    stalled = {"type": "Stalled", "status": "True", "reason": "BaseModelNotFound"}
    observed.observe(CONTRIBUTIONS, "ADDED", contribution("a", "Pending", conditions=[stalled]))
    observed.observe(
        CONTRIBUTIONS,
        "ADDED",
        contribution(
            "b",
            "Succeeded",
            training={"imagesPerSecond": 123.5, "loss": 0.25, "seconds": 40},
            metrics={"accuracy": 0.9, "note": "not a number"},
            job={
                "attempts": 2,
                "startTime": "2026-11-29T00:00:00Z",
                "completionTime": "2026-11-29T00:02:00Z",
            },
        ),
    )
    got = samples(observed)
    key = {"namespace": "hospital-a", "task": "chest-xray"}
    assert value(got, "medforge_contributions", **key, phase="Pending") == 1
    assert value(got, "medforge_contributions", **key, phase="Succeeded") == 1
    assert value(got, "medforge_contributions", **key, phase="Failed") == 0  # zeros, not gaps
    one = {"namespace": "hospital-a", "name": "a", "task": "chest-xray"}
    assert value(got, "medforge_contribution_stalled", **one, reason="BaseModelNotFound") == 1
    b = {"namespace": "hospital-a", "name": "b", "task": "chest-xray"}
    assert value(got, "medforge_contribution_images_per_second", **b) == 123.5
    assert value(got, "medforge_contribution_training_loss", **b) == 0.25
    assert value(got, "medforge_contribution_validation_metric", **b, metric="accuracy") == 0.9
    assert value(got, "medforge_contribution_validation_metric", **b, metric="note") is None
    assert value(got, "medforge_training_duration_seconds_sum") == 120
    assert value(got, "medforge_training_duration_seconds_bucket", le="60.0") == 0
    assert value(got, "medforge_training_duration_seconds_bucket", le="300.0") == 1
    assert value(got, "medforge_training_attempts_bucket", le="2.0") == 1

    # Deleted: its series go with it.
    observed.observe(CONTRIBUTIONS, "DELETED", contribution("a", "Pending"))
    got = samples(observed)
    assert value(got, "medforge_contribution_stalled", **one, reason="BaseModelNotFound") is None
    assert value(got, "medforge_contributions", **key, phase="Pending") == 0


def test_composite_revision_scores_outcome_and_age() -> None:
    observed = ObservedObjects()
    status = {
        "phase": "Ready",
        "revision": 3,
        "inputCounts": {"Included": 2, "Excluded": 1, "Pending": 1},
        "excluded": {"sha256:1": "IsolatedAfterFailures"},
        "isolation": {"groups": [["sha256:2"], ["sha256:3"]]},
        "current": {
            "revision": 2,
            "score": 0.8,
            "metrics": {"derm": {"accuracy": 0.8, "f1": 0.7}},
            "completedAt": "2026-11-29T00:10:00Z",
        },
        "history": [
            {
                "revision": 3,
                "state": "Rejected",
                "reason": "RegressionOverGate",
                "startedAt": "2026-11-29T00:20:00Z",
                "completedAt": "2026-11-29T00:21:00Z",
                "attempt": 1,
                "mergeSeconds": 12.5,
                "searchEvaluations": 80,
            },
            {"revision": 2, "state": "Accepted", "attempt": 2},
        ],
    }
    observed.observe(COMPOSITES, "ADDED", composite("forge-model", **status))
    now = parse_time("2026-11-29T01:10:00Z")
    assert now is not None
    got = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in families(observed.snapshot(), now)
        for s in fam.samples
    }
    ident = {"namespace": "forge", "name": "forge-model"}
    assert value(got, "medforge_composite_revision", **ident) == 2
    assert value(got, "medforge_composite_latest_revision", **ident) == 3
    assert value(got, "medforge_composite_score", **ident) == 0.8
    assert value(got, "medforge_composite_task_metric", **ident, task="derm", metric="f1") == 0.7
    assert value(got, "medforge_composite_inputs", **ident, state="Pending") == 1
    excluded = value(
        got, "medforge_composite_excluded_inputs", **ident, reason="IsolatedAfterFailures"
    )
    assert excluded == 1
    assert value(got, "medforge_composite_isolation_groups", **ident) == 2
    outcome = value(
        got,
        "medforge_composite_last_revision_outcome",
        **ident,
        state="Rejected",
        reason="RegressionOverGate",
    )
    assert outcome == 3
    assert value(got, "medforge_composite_seconds_since_accepted_revision", **ident) == 3600
    assert value(got, "medforge_composite_merge_seconds", **ident) == 12.5
    assert value(got, "medforge_composite_search_evaluations", **ident) == 80
    assert value(got, "medforge_merge_duration_seconds_sum") == 60
    assert value(got, "medforge_merge_attempts_count") == 2


def test_waiting_composite_ages_from_its_creation_and_standby_exports_nothing() -> None:
    observed = ObservedObjects()
    observed.observe(COMPOSITES, "ADDED", composite("new", phase="Waiting"))
    observed.observe(
        BASEMODELS,
        "ADDED",
        {"metadata": {"name": "clip"}, "status": {"phase": "Ready", "sizeBytes": 10}},
    )
    got = samples(observed)
    age = value(
        got, "medforge_composite_seconds_since_accepted_revision", namespace="forge", name="new"
    )
    assert age is not None and age > 0
    assert value(got, "medforge_composite_revision", namespace="forge", name="new") == 0
    assert value(got, "medforge_basemodels", phase="Ready") == 1
    assert value(got, "medforge_basemodel_size_bytes", name="clip") == 10
    assert value(got, "medforge_operator_leader") == 1
    standby = samples(observed, leading=False)
    assert value(standby, "medforge_operator_leader") == 0
    assert {name for name, _ in standby} == {"medforge_operator_leader"}


def test_hostile_numbers_are_not_exported() -> None:
    observed = ObservedObjects()
    bad = contribution(
        "x",
        "Succeeded",
        training={"imagesPerSecond": float("nan"), "loss": True, "seconds": "12"},
        metrics={"accuracy": float("inf")},
    )
    observed.observe(CONTRIBUTIONS, "ADDED", bad)
    names = {name for name, _ in samples(observed)}
    assert "medforge_contribution_images_per_second" not in names
    assert "medforge_contribution_training_loss" not in names
    assert "medforge_contribution_validation_metric" not in names
