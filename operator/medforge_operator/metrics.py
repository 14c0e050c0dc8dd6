"""Prometheus metrics of the operator (served on MEDFORGE_METRICS_PORT)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

JOBS_CREATED = Counter("medforge_jobs_created_total", "Jobs created by the operator", ["component"])
VERIFICATIONS = Counter(
    "medforge_artifact_verifications_total", "Artifact verifications", ["outcome"]
)
RECONCILES = Counter("medforge_reconciles_total", "Reconcile rounds", ["kind", "outcome"])
RECONCILE_SECONDS = Histogram(
    "medforge_reconcile_seconds", "Duration of a reconcile round", ["kind"]
)
REVISIONS = Counter("medforge_revisions_total", "Composite revisions finished", ["outcome"])
