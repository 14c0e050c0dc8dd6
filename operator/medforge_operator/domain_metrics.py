"""MedForge's domain state as Prometheus metrics, computed at scrape time from the observed
objects (observed.py): gauges of what is true now, histograms over what finished. Nothing here
is bumped by a handler, so nothing drifts, and a deleted object's series vanish with it.

Every name and label is documented in docs/observability.md; the dashboard and the alerting
rules (tools/monitoring.py) are written against them and tested against a real Prometheus."""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import (
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from medforge_common.api import BaseModelPhase, CompositePhase, ConditionType, ContributionPhase
from medforge_common.result import finite_number
from medforge_operator import BASEMODELS, COMPOSITES, CONTRIBUTIONS, PRIVACYBUDGETS
from medforge_operator.bodies import Obj
from medforge_operator.composite import withdrawal
from medforge_operator.observed import ObservedObjects
from medforge_operator.site_metrics import site_families

JSON = dict[str, Any]
TRAINING_BUCKETS = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0)
MERGE_BUCKETS = (10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0)
ATTEMPT_BUCKETS = (1.0, 2.0, 3.0, 5.0, 10.0)


def parse_time(value: Any) -> float | None:
    """Seconds since the epoch of an RFC 3339 time as the API server writes it, or None."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _condition(status: JSON, ctype: str) -> JSON:
    return next((c for c in status.get("conditions") or [] if c.get("type") == ctype), {})


def _histogram(
    name: str, doc: str, buckets: tuple[float, ...], values: Iterable[float]
) -> HistogramMetricFamily:
    vals = list(values)
    counts = [sum(1 for v in vals if v <= b) for b in buckets]
    h = HistogramMetricFamily(name, doc)
    h.add_metric(
        [],
        [(str(b), float(c)) for b, c in zip(buckets, counts, strict=True)]
        + [("+Inf", float(len(vals)))],
        sum_value=sum(vals),
    )
    return h


def _ident(obj: Obj) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def _contribution_gauges() -> dict[str, GaugeMetricFamily]:
    ident = ["namespace", "name", "task"]
    specs = {
        "contributions": (
            "LoRAContributions by namespace, task and phase",
            ["namespace", "task", "phase"],
        ),
        "contribution_phase": ("1 for each contribution's current phase", [*ident, "phase"]),
        "contribution_stalled": (
            "1 while a contribution's Stalled condition is True (the reason says why)",
            [*ident, "reason"],
        ),
        "contribution_images_per_second": ("Training throughput the trainer reported", ident),
        "contribution_training_loss": ("Final training loss the trainer reported", ident),
        "contribution_training_seconds": ("Seconds the trainer spent in its training loop", ident),
        "contribution_validation_metric": (
            "Validation metrics the trainer reported on the hospital's held-out split",
            [*ident, "metric"],
        ),
    }
    return {
        key: GaugeMetricFamily(f"medforge_{key}", doc, labels=labels)
        for key, (doc, labels) in specs.items()
    }


def _add_contribution(
    g: dict[str, GaugeMetricFamily], c: JSON, durations: list[float], attempts: list[float]
) -> tuple[str, str, str]:
    """One contribution's samples; (namespace, task, phase) for the counts by phase."""
    ns, name = _ident(c)
    status = c.get("status") or {}
    task = str(((c.get("spec") or {}).get("task") or {}).get("name") or "")
    ph = str(status.get("phase") or ContributionPhase.PENDING)
    g["contribution_phase"].add_metric([ns, name, task, ph], 1.0)
    cond = _condition(status, ConditionType.STALLED)
    g["contribution_stalled"].add_metric(
        [ns, name, task, str(cond.get("reason") or "")],
        1.0 if cond.get("status") == "True" else 0.0,
    )
    training = status.get("training") or {}
    for family, key in (
        ("contribution_images_per_second", "imagesPerSecond"),
        ("contribution_training_loss", "loss"),
        ("contribution_training_seconds", "seconds"),
    ):
        if (v := finite_number(training.get(key))) is not None:
            g[family].add_metric([ns, name, task], v)
    for metric, value in sorted((status.get("metrics") or {}).items()):
        if (v := finite_number(value)) is not None:
            g["contribution_validation_metric"].add_metric([ns, name, task, str(metric)], v)
    job = status.get("job") or {}
    if ph in (ContributionPhase.SUCCEEDED, ContributionPhase.FAILED):
        start, end = parse_time(job.get("startTime")), parse_time(job.get("completionTime"))
        if start is not None and end is not None and end >= start:
            durations.append(end - start)
        if (n := finite_number(job.get("attempts"))) is not None:
            attempts.append(n)
    return ns, task, ph


def contribution_families(contribs: list[JSON]) -> Iterator[Metric]:
    g = _contribution_gauges()
    counts: Counter[tuple[str, str, str]] = Counter()
    durations: list[float] = []
    attempts: list[float] = []
    for c in contribs:
        counts[_add_contribution(g, c, durations, attempts)] += 1
    for ns, task in sorted({(ns, task) for ns, task, _ in counts}):
        for ph in ContributionPhase:  # zeros too: a phase emptied shows as 0, not as a gap
            g["contributions"].add_metric([ns, task, ph.value], float(counts[(ns, task, ph.value)]))
    yield from g.values()
    yield _histogram(
        "medforge_training_duration_seconds",
        "Wall time of finished training Jobs (start to completion)",
        TRAINING_BUCKETS,
        durations,
    )
    yield _histogram(
        "medforge_training_attempts",
        "Pod attempts of finished training Jobs",
        ATTEMPT_BUCKETS,
        attempts,
    )


def _composite_gauges() -> dict[str, GaugeMetricFamily]:
    ident = ["namespace", "name"]
    specs = {
        "phase": ("1 for each composite's current phase", [*ident, "phase"]),
        "stalled": ("1 while a composite's Stalled condition is True", [*ident, "reason"]),
        "revision": ("The revision served now (0: none accepted yet)", ident),
        "latest_revision": ("The newest revision planned", ident),
        "inputs": ("Inputs by state (Included, Excluded, Pending)", [*ident, "state"]),
        "excluded_inputs": (
            "Excluded inputs by reason code (IsolatedAfterFailures, RejectedByGate, ...)",
            [*ident, "reason"],
        ),
        "isolation_groups": (
            "Groups of new inputs still to try while isolating a failing or regressing "
            "revision (0 when not isolating)",
            ident,
        ),
        "score": ("Mean accuracy of the served revision over its evaluation tasks", ident),
        "task_metric": (
            "Per-task metrics of the served revision",
            [*ident, "task", "metric"],
        ),
        "last_revision_outcome": (
            "The newest finished revision: its number, labelled with its state and reason",
            [*ident, "state", "reason"],
        ),
        "revisions": (
            "Revisions in the kept history by state and reason",
            [*ident, "state", "reason"],
        ),
        "seconds_since_accepted_revision": (
            "Seconds since the last accepted revision (since creation while none was)",
            ident,
        ),
        "withdrawal_pending_seconds": (
            "Seconds the oldest withdrawal without an accepted replacement has waited (0: none)",
            ident,
        ),
        "withdrawal_deadline_seconds": (
            "spec.withdrawal.deadline in seconds (MedForgeWithdrawalNotReplaced fires past it)",
            ident,
        ),
        "merge_seconds": ("Seconds the newest merge that ran spent merging", ident),
        "search_evaluations": (
            "Coefficient-search evaluations of the newest merge that ran",
            ident,
        ),
    }
    return {
        key: GaugeMetricFamily(f"medforge_composite_{key}", doc, labels=labels)
        for key, (doc, labels) in specs.items()
    }


def _one_composite(
    g: dict[str, GaugeMetricFamily], c: JSON, now: float, durations: list[float], tries: list[float]
) -> None:
    ns, name = _ident(c)
    status = c.get("status") or {}
    ident = [ns, name]
    g["phase"].add_metric([*ident, str(status.get("phase") or CompositePhase.WAITING)], 1.0)
    cond = _condition(status, "Stalled")
    g["stalled"].add_metric(
        [*ident, str(cond.get("reason") or "")], 1.0 if cond.get("status") == "True" else 0.0
    )
    current = status.get("current") or {}
    g["revision"].add_metric(ident, finite_number(current.get("revision")) or 0.0)
    g["latest_revision"].add_metric(ident, finite_number(status.get("revision")) or 0.0)
    for state, n in sorted((status.get("inputCounts") or {}).items()):
        if (v := finite_number(n)) is not None:
            g["inputs"].add_metric([*ident, str(state)], v)
    excluded = status.get("excluded")
    reasons = Counter(str(r) for r in (excluded.values() if isinstance(excluded, dict) else []))
    for reason, n in sorted(reasons.items()):
        g["excluded_inputs"].add_metric([*ident, reason], float(n))
    iso = status.get("isolation")
    groups = iso.get("groups") if isinstance(iso, dict) else None
    g["isolation_groups"].add_metric(ident, float(len(groups) if isinstance(groups, list) else 0))
    if (score := finite_number(current.get("score"))) is not None:
        g["score"].add_metric(ident, score)
    for task, values in sorted((current.get("metrics") or {}).items()):
        for metric, value in sorted((values or {}).items() if isinstance(values, dict) else []):
            if (v := finite_number(value)) is not None:
                g["task_metric"].add_metric([*ident, str(task), str(metric)], v)
    _history(g, ident, status, durations, tries)
    at = dt.datetime.fromtimestamp(now, dt.UTC)
    g["withdrawal_pending_seconds"].add_metric(ident, withdrawal.overdue_seconds(status, at))
    try:
        _, deadline = withdrawal.settings(c.get("spec") or {})
    except ValueError:
        deadline = withdrawal.seconds(withdrawal.DEFAULT_DEADLINE)
    g["withdrawal_deadline_seconds"].add_metric(ident, float(deadline))
    since = parse_time(current.get("completedAt")) or parse_time(
        (c.get("metadata") or {}).get("creationTimestamp")
    )
    if since is not None:
        g["seconds_since_accepted_revision"].add_metric(ident, max(0.0, now - since))


def _history(
    g: dict[str, GaugeMetricFamily],
    ident: list[str],
    status: JSON,
    durations: list[float],
    tries: list[float],
) -> None:
    history = [h for h in status.get("history") or [] if isinstance(h, dict)]
    if history:
        last = history[0]
        g["last_revision_outcome"].add_metric(
            [*ident, str(last.get("state") or ""), str(last.get("reason") or "")],
            finite_number(last.get("revision")) or 0.0,
        )
    # The newest revision that merged at all (a verdict without a merge reports no figures).
    merged = next((h for h in history if finite_number(h.get("mergeSeconds")) is not None), None)
    if merged is not None:
        for key, field in (
            ("merge_seconds", "mergeSeconds"),
            ("search_evaluations", "searchEvaluations"),
        ):
            if (v := finite_number(merged.get(field))) is not None:
                g[key].add_metric(ident, v)
    by_state: Counter[tuple[str, str]] = Counter()
    for h in history:
        by_state[(str(h.get("state") or ""), str(h.get("reason") or ""))] += 1
        start, end = parse_time(h.get("startedAt")), parse_time(h.get("completedAt"))
        if start is not None and end is not None and end >= start:
            durations.append(end - start)
        if (n := finite_number(h.get("attempt"))) is not None:
            tries.append(n)
    for (state, reason), n in sorted(by_state.items()):
        g["revisions"].add_metric([*ident, state, reason], float(n))


def composite_families(composites: list[JSON], now: float) -> Iterator[Metric]:
    g = _composite_gauges()
    durations: list[float] = []
    tries: list[float] = []
    for c in composites:
        _one_composite(g, c, now, durations, tries)
    yield from g.values()
    yield _histogram(
        "medforge_merge_duration_seconds",
        "Wall time of the kept revisions' merge Jobs (start to completion)",
        MERGE_BUCKETS,
        durations,
    )
    yield _histogram(
        "medforge_merge_attempts",
        "Attempts the kept revisions took (a merge that fails as a whole is retried)",
        ATTEMPT_BUCKETS,
        tries,
    )


def basemodel_families(models: list[JSON]) -> Iterator[Metric]:
    by_phase = GaugeMetricFamily("medforge_basemodels", "BaseModels by phase", labels=["phase"])
    size = GaugeMetricFamily(
        "medforge_basemodel_size_bytes", "Verified size of each BaseModel", labels=["name"]
    )
    counts = Counter(str((m.get("status") or {}).get("phase") or "Pending") for m in models)
    for ph in BaseModelPhase:
        by_phase.add_metric([ph.value], float(counts[ph.value]))
    for m in models:
        if (v := finite_number((m.get("status") or {}).get("sizeBytes"))) is not None:
            size.add_metric([_ident(m)[1]], v)
    yield from (by_phase, size)


def budget_families(budgets: list[JSON]) -> Iterator[Metric]:
    """Each PrivacyBudget's total, spent and remaining epsilon (the dashboard's budget panel)."""
    g = GaugeMetricFamily(
        "medforge_privacy_budget_epsilon",
        "A PrivacyBudget's epsilon: total (spec), spent and remaining (reserved by the operator)",
        labels=["namespace", "name", "kind"],
    )
    for b in budgets:
        ns, name = _ident(b)
        total = finite_number((b.get("spec") or {}).get("epsilon"))
        spent = finite_number(((b.get("status") or {}).get("spent") or {}).get("epsilon")) or 0.0
        if total is None:
            continue
        # Remaining from the spec as it is now: the officer may have raised the total since.
        for kind, v in (("total", total), ("spent", spent), ("remaining", max(0.0, total - spent))):
            g.add_metric([ns, name, kind], v)
    yield g


def families(snapshot: dict[str, list[JSON]], now: float) -> Iterator[Metric]:
    """Every domain metric family for one snapshot of the observed objects."""
    yield from contribution_families(snapshot.get(CONTRIBUTIONS, []))
    yield from composite_families(snapshot.get(COMPOSITES, []), now)
    yield from site_families(snapshot.get(COMPOSITES, []))
    yield from basemodel_families(snapshot.get(BASEMODELS, []))
    yield from budget_families(snapshot.get(PRIVACYBUDGETS, []))


class DomainCollector(Collector):
    """Registered once in main. Only the leader exports domain state, so that sums over
    replicas count each object once; a standby reports `medforge_operator_leader 0` alone."""

    def __init__(self, observed: ObservedObjects, leading: Callable[[], bool]) -> None:
        self._observed = observed
        self._leading = leading

    def collect(self) -> Iterator[Metric]:
        leading = self._leading()
        leader = GaugeMetricFamily(
            "medforge_operator_leader", "1 on the replica that reconciles, 0 on a standby"
        )
        leader.add_metric([], 1.0 if leading else 0.0)
        yield leader
        if leading:
            yield from families(self._observed.snapshot(), time.time())
