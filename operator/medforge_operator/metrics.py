"""Prometheus metrics of the operator (served on MEDFORGE_METRICS_PORT)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from medforge_common.api import WithdrawalReason

JOBS_CREATED = Counter("medforge_jobs_created_total", "Jobs created by the operator", ["component"])
VERIFICATIONS = Counter(
    "medforge_artifact_verifications_total", "Artifact verifications", ["outcome"]
)
VERIFIED_BYTES = Counter(
    "medforge_artifact_verified_bytes_total",
    "Bytes whose sha256 matched their manifest, by kind (contribution, composite, basemodel)",
    ["kind"],
)
VERIFICATION_FAILURES = Counter(
    "medforge_artifact_verification_failures_total",
    "Artifacts refused at verification, by kind and reason",
    ["kind", "reason"],
)
RECONCILES = Counter("medforge_reconciles_total", "Reconcile rounds", ["kind", "outcome"])
RECONCILE_SECONDS = Histogram(
    "medforge_reconcile_seconds", "Duration of a reconcile round", ["kind"]
)
WITHDRAWALS = Counter(
    "medforge_withdrawals_total",
    "Inputs that left a composite, by reason (ContributionDeleted, ConsentWithdrawn, "
    "NoLongerSelected)",
    ["reason"],
)
WITHDRAWALS_ERASED = Counter(
    "medforge_withdrawal_erasures_total", "Withdrawals whose files were erased from the store"
)
REVISIONS = Counter("medforge_revisions_total", "Composite revisions finished", ["outcome"])

# The work queue and the controllers, in the names controller-runtime exports (so the dashboards
# people already have for Go operators chart MedForge's too).
WORKQUEUE_DEPTH = Gauge("workqueue_depth", "Current depth of the work queue", ["name"])
WORKQUEUE_ADDS = Counter("workqueue_adds_total", "Keys added to the work queue", ["name"])
WORKQUEUE_RETRIES = Counter(
    "workqueue_retries_total", "Keys queued again after a failed round (with backoff)", ["name"]
)
WORKQUEUE_QUEUE_SECONDS = Histogram(
    "workqueue_queue_duration_seconds",
    "How long a key waits in the queue before a worker takes it",
    ["name"],
    buckets=(0.001, 0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
WORKQUEUE_WORK_SECONDS = Histogram(
    "workqueue_work_duration_seconds",
    "How long a round takes",
    ["name"],
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
ACTIVE_WORKERS = Gauge(
    "controller_runtime_active_workers", "Workers running a round now", ["controller"]
)
RECONCILE_TOTAL = Counter(
    "controller_runtime_reconcile_total", "Reconcile rounds by result", ["controller", "result"]
)
RECONCILE_ERRORS = Counter(
    "controller_runtime_reconcile_errors_total", "Reconcile rounds that failed", ["controller"]
)
RECONCILE_TIME = Histogram(
    "controller_runtime_reconcile_time_seconds", "Duration of a reconcile round", ["controller"]
)


def verified(kind: str, nbytes: int) -> None:
    VERIFICATIONS.labels("ok").inc()
    VERIFIED_BYTES.labels(kind).inc(nbytes)


def verification_failed(kind: str, reason: str) -> None:
    VERIFICATIONS.labels("failed").inc()
    VERIFICATION_FAILURES.labels(kind, reason).inc()


CONTROLLERS = ("contribution", "composite", "basemodel")
# The reasons verification refuses an artifact for, per kind (api.Reason values).
VERIFICATION_REASONS = {
    "contribution": ("DigestMismatch", "InvalidManifest", "BaseModelMismatch"),
    "composite": ("DigestMismatch", "InvalidResult"),
    "basemodel": ("VerificationFailed",),
}


def preset(queue: str = "medforge") -> None:
    """Create every known label set at 0, so that rates and alerts see a series from the
    first scrape instead of nothing until the first error."""
    for why in WithdrawalReason:
        WITHDRAWALS.labels(why.value)
    for controller in CONTROLLERS:
        RECONCILE_ERRORS.labels(controller)
        ACTIVE_WORKERS.labels(controller)
        for result in ("success", "error"):
            RECONCILE_TOTAL.labels(controller, result)
    for kind, reasons in VERIFICATION_REASONS.items():
        VERIFIED_BYTES.labels(kind)
        for reason in reasons:
            VERIFICATION_FAILURES.labels(kind, reason)
    WORKQUEUE_DEPTH.labels(queue)
    WORKQUEUE_ADDS.labels(queue)
    WORKQUEUE_RETRIES.labels(queue)
    for outcome in ("accepted", "rejected", "failed"):
        REVISIONS.labels(outcome)
