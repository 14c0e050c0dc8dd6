"""The Grafana dashboard and the Prometheus alerts, kept as code beside the metrics they read.

`make generate` writes them into the chart:
helm/medforge/files/dashboard.json (shipped as a ConfigMap labelled for Grafana's dashboard
sidecar) and helm/medforge/files/alerts.json (rendered into a PrometheusRule, with the wait
times and thresholds taken from the chart's values). A unit test regenerates both and compares,
and a cluster test runs every query against a real Prometheus scraping the operator."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

JSON = dict[str, Any]
CHART_FILES = Path(__file__).resolve().parents[1] / "helm" / "medforge" / "files"
DASHBOARD_UID = "medforge-overview"

# Dashboard variables as the queries use them (Grafana expands these).
NS = 'namespace=~"$namespace"'
FORGE = 'namespace=~"$forge_namespace", name=~"$composite"'
SITE = 'composite=~"$forge_namespace/$composite"'


@dataclass(frozen=True)
class Panel:
    title: str
    kind: str  # timeseries, stat, table, bargauge
    targets: list[tuple[str, str]]  # (PromQL, legend)
    unit: str = "short"
    width: int = 12
    height: int = 8
    description: str = ""
    options: JSON = field(default_factory=dict)


@dataclass(frozen=True)
class Row:
    title: str
    panels: list[Panel]


ROWS = [
    Row(
        "Contributions",
        [
            Panel(
                "Contributions by phase",
                "timeseries",
                [(f"sum by (phase) (medforge_contributions{{{NS}}})", "{{phase}}")],
                description="LoRAContributions in the selected hospital namespaces, by phase.",
                options={"stack": True},
            ),
            Panel(
                "Stalled contributions",
                "table",
                [
                    (
                        f"max by (namespace, name, task, reason) "
                        f"(medforge_contribution_stalled{{{NS}}}) == 1",
                        "",
                    )
                ],
                description="Contributions whose Stalled condition is True, with the reason.",
            ),
            Panel(
                "Training throughput",
                "timeseries",
                [
                    (
                        f"max by (namespace, name) "
                        f"(medforge_contribution_images_per_second{{{NS}}})",
                        "{{namespace}}/{{name}}",
                    )
                ],
                unit="none",
                description="Images per second each contribution's trainer reported.",
            ),
            Panel(
                "Validation accuracy per contribution",
                "bargauge",
                [
                    (
                        f"max by (namespace, name, task) "
                        f'(medforge_contribution_validation_metric{{{NS}, metric="accuracy"}})',
                        "{{namespace}}/{{name}} ({{task}})",
                    )
                ],
                unit="percentunit",
            ),
        ],
    ),
    Row(
        "Composite model",
        [
            Panel(
                "Served revision",
                "stat",
                [(f"max by (name) (medforge_composite_revision{{{FORGE}}})", "{{name}}")],
                width=6,
                height=5,
            ),
            Panel(
                "Hours since the last accepted revision",
                "stat",
                [
                    (
                        f"max by (name) "
                        f"(medforge_composite_seconds_since_accepted_revision{{{FORGE}}}) / 3600",
                        "{{name}}",
                    )
                ],
                unit="h",
                width=6,
                height=5,
            ),
            Panel(
                "Inputs by state",
                "bargauge",
                [(f"max by (state) (medforge_composite_inputs{{{FORGE}}})", "{{state}}")],
                width=12,
                height=5,
            ),
            Panel(
                "Revision timeline and score",
                "timeseries",
                [
                    (f"max by (name) (medforge_composite_score{{{FORGE}}})", "score {{name}}"),
                    (
                        f"max by (name) (medforge_composite_revision{{{FORGE}}})",
                        "revision {{name}}",
                    ),
                ],
                description="The served revision's score (mean accuracy over the evaluation "
                "tasks) and its number; a step is a new accepted revision.",
            ),
            Panel(
                "Per-task accuracy of the served revision",
                "timeseries",
                [
                    (
                        f"max by (task) "
                        f'(medforge_composite_task_metric{{{FORGE}, metric="accuracy"}})',
                        "{{task}}",
                    )
                ],
                unit="percentunit",
            ),
            Panel(
                "Revisions by outcome and reason",
                "table",
                [
                    (
                        f"max by (name, state, reason) (medforge_composite_revisions{{{FORGE}}})",
                        "",
                    ),
                    (
                        f"max by (name, state, reason) "
                        f"(medforge_composite_last_revision_outcome{{{FORGE}}})",
                        "",
                    ),
                ],
                description="Revisions in the kept history by state (Accepted, Rejected by "
                "the gate, Failed) and reason; and the newest revision's outcome.",
            ),
        ],
    ),
    Row(
        "Durations",
        [
            Panel(
                "Training duration (p50, p90)",
                "timeseries",
                [
                    (
                        f"histogram_quantile({q}, sum by (le) "
                        "(medforge_training_duration_seconds_bucket))",
                        f"p{int(q * 100)}",
                    )
                    for q in (0.5, 0.9)
                ],
                unit="s",
                width=8,
            ),
            Panel(
                "Merge duration (p50, p90)",
                "timeseries",
                [
                    (
                        f"histogram_quantile({q}, sum by (le) "
                        "(medforge_merge_duration_seconds_bucket))",
                        f"p{int(q * 100)}",
                    )
                    for q in (0.5, 0.9)
                ],
                unit="s",
                width=8,
            ),
            Panel(
                "Newest merge: seconds and search evaluations",
                "timeseries",
                [
                    (
                        f"max by (name) (medforge_composite_merge_seconds{{{FORGE}}})",
                        "seconds {{name}}",
                    ),
                    (
                        f"max by (name) (medforge_composite_search_evaluations{{{FORGE}}})",
                        "evaluations {{name}}",
                    ),
                ],
                width=8,
            ),
        ],
    ),
    Row(
        "Sites: each hospital's own patients",
        [
            Panel(
                "Accuracy of each candidate on each site's own images (revision x site)",
                "timeseries",
                [
                    (
                        f'max by (composite, site) (medforge_site_metric{{metric="accuracy", {SITE}}})',
                        "{{site}} ({{composite}})",
                    ),
                ],
                unit="percentunit",
                description="Every candidate revision is scored by each consenting hospital "
                "(EvaluationSet) beside the served revision; one point per candidate. The table "
                "per revision: medforge describe composite.",
                width=12,
            ),
            Panel(
                "Drop against the served revision, per site",
                "bargauge",
                [
                    (
                        f'max by (composite, site) (medforge_site_metric{{metric="drop", {SITE}}})',
                        "{{site}}",
                    ),
                ],
                unit="percentunit",
                description="Served minus candidate accuracy on the site's images: above "
                "spec.gate.sites.maxRegression (and significant for its sample count) the "
                "candidate is rejected with SiteRegression.",
                width=12,
            ),
        ],
    ),
    Row(
        "Withdrawal and privacy",
        [
            Panel(
                "Withdrawals by reason (24 h)",
                "timeseries",
                [("sum by (reason) (increase(medforge_withdrawals_total[24h]))", "{{reason}}")],
                description="Inputs that left a composite: deleted, consent withdrawn, or no "
                "longer selected.",
                width=8,
            ),
            Panel(
                "Oldest withdrawal waiting for its replacement",
                "timeseries",
                [
                    (
                        f"max by (name) (medforge_composite_withdrawal_pending_seconds{{{FORGE}}})",
                        "waiting {{name}}",
                    ),
                    (
                        f"max by (name) (medforge_composite_withdrawal_deadline_seconds{{{FORGE}}})",
                        "deadline {{name}}",
                    ),
                ],
                unit="s",
                description="Until the replacement revision is accepted no revision holding the "
                "withdrawn input is served; the alert fires past spec.withdrawal.deadline.",
                width=8,
            ),
            Panel(
                "Privacy budgets: epsilon spent of the total",
                "bargauge",
                [
                    (
                        "max by (namespace, name) (medforge_privacy_budget_epsilon"
                        '{namespace=~"$namespace", kind="spent"})',
                        "{{namespace}}/{{name}} spent",
                    ),
                    (
                        "max by (namespace, name) (medforge_privacy_budget_epsilon"
                        '{namespace=~"$namespace", kind="total"})',
                        "{{namespace}}/{{name}} total",
                    ),
                ],
                description="Each PrivacyBudget's epsilon reserved by the operator at admission, "
                "and its total; a contribution that would exceed it is refused.",
                width=8,
            ),
        ],
    ),
    Row(
        "Verification",
        [
            Panel(
                "Bytes verified",
                "timeseries",
                [
                    (
                        "sum by (kind) (rate(medforge_artifact_verified_bytes_total[$__rate_interval]))",
                        "{{kind}}",
                    )
                ],
                unit="Bps",
            ),
            Panel(
                "Verification failures by reason (1 h)",
                "timeseries",
                [
                    (
                        "sum by (kind, reason) "
                        "(increase(medforge_artifact_verification_failures_total[1h]))",
                        "{{kind}} {{reason}}",
                    )
                ],
            ),
        ],
    ),
    Row(
        "Operator",
        [
            Panel(
                "Leader",
                "stat",
                [("sum(medforge_operator_leader)", "replicas leading")],
                width=4,
                height=5,
            ),
            Panel(
                "Reconciles by result",
                "timeseries",
                [
                    (
                        "sum by (controller, result) "
                        "(rate(controller_runtime_reconcile_total[$__rate_interval]))",
                        "{{controller}} {{result}}",
                    )
                ],
                unit="ops",
                width=10,
            ),
            Panel(
                "Reconcile errors",
                "timeseries",
                [
                    (
                        "sum by (controller) "
                        "(rate(controller_runtime_reconcile_errors_total[$__rate_interval]))",
                        "{{controller}}",
                    )
                ],
                unit="ops",
                width=10,
            ),
            Panel(
                "Reconcile time (p99)",
                "timeseries",
                [
                    (
                        "histogram_quantile(0.99, sum by (le, controller) "
                        "(rate(controller_runtime_reconcile_time_seconds_bucket"
                        "[$__rate_interval])))",
                        "{{controller}}",
                    )
                ],
                unit="s",
                width=8,
            ),
            Panel(
                "Work queue depth and workers",
                "timeseries",
                [
                    ("sum by (name) (workqueue_depth)", "depth {{name}}"),
                    (
                        "sum by (controller) (controller_runtime_active_workers)",
                        "busy workers {{controller}}",
                    ),
                ],
                width=8,
            ),
            Panel(
                "Queue wait (p99) and retries",
                "timeseries",
                [
                    (
                        "histogram_quantile(0.99, sum by (le) "
                        "(rate(workqueue_queue_duration_seconds_bucket[$__rate_interval])))",
                        "queue wait p99",
                    ),
                    (
                        "sum(rate(workqueue_retries_total[$__rate_interval]))",
                        "retries/s",
                    ),
                ],
                width=8,
            ),
        ],
    ),
]


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    for_value: str  # the chart value under monitoring.alerts that holds the wait
    severity: str
    summary: str
    description: str


# `$NO_REVISION_HOURS` is replaced by the chart's monitoring.alerts.noAcceptedRevisionHours.
ALERTS = [
    Alert(
        "MedForgeContributionStalled",
        "max by (namespace, name, task, reason) (medforge_contribution_stalled) == 1",
        "stalledFor",
        "warning",
        "LoRAContribution {{ $labels.namespace }}/{{ $labels.name }} is stalled",
        "Its Stalled condition has been True with reason {{ $labels.reason }}; "
        "kubectl describe loracontribution -n {{ $labels.namespace }} {{ $labels.name }} "
        "says what to change.",
    ),
    Alert(
        "MedForgeCompositeStalled",
        "max by (namespace, name, reason) (medforge_composite_stalled) == 1",
        "stalledFor",
        "warning",
        "CompositeModel {{ $labels.namespace }}/{{ $labels.name }} is stalled",
        "Its Stalled condition has been True with reason {{ $labels.reason }}.",
    ),
    Alert(
        "MedForgeVerificationFailures",
        "sum by (kind, reason) (increase(medforge_artifact_verification_failures_total[15m])) > 0",
        "verificationFailuresFor",
        "warning",
        "{{ $labels.kind }} artifacts failed verification ({{ $labels.reason }})",
        "Uploaded bytes did not match their manifest, or the manifest was malformed: a broken "
        "upload, or somebody writing to the forge bucket who should not.",
    ),
    Alert(
        "MedForgeRevisionRejected",
        'max by (namespace, name, reason) (medforge_composite_last_revision_outcome{state="Rejected"}) > 0',
        "revisionRejectedFor",
        "info",
        "The newest revision of {{ $labels.namespace }}/{{ $labels.name }} was rejected",
        "Revision {{ $value }} was not accepted ({{ $labels.reason }}); the previous revision "
        "is still served and the inputs that caused it are excluded.",
    ),
    Alert(
        "MedForgeSiteRegression",
        'max by (composite, site) (medforge_site_metric{metric="regressed"}) == 1',
        "siteRegressionFor",
        "warning",
        "A candidate of {{ $labels.composite }} regressed on site {{ $labels.site }}",
        "On that hospital's own held-out images the newest candidate scored significantly "
        "below the served revision (spec.gate.sites.maxRegression); it was rejected and the "
        "hospital got an Event with its figures. The new inputs that cause it are excluded.",
    ),
    Alert(
        "MedForgeNoAcceptedRevision",
        "(max by (namespace, name) (medforge_composite_seconds_since_accepted_revision) "
        "> $NO_REVISION_HOURS * 3600) and on (namespace, name) "
        '(max by (namespace, name) (medforge_composite_inputs{state="Pending"}) > 0)',
        "noAcceptedRevisionFor",
        "warning",
        "{{ $labels.namespace }}/{{ $labels.name }} has accepted no revision for long",
        "Inputs are pending but no revision was accepted for more than $NO_REVISION_HOURS hours.",
    ),
    Alert(
        "MedForgeWithdrawalNotReplaced",
        "max by (namespace, name) (medforge_composite_withdrawal_pending_seconds) "
        "> max by (namespace, name) (medforge_composite_withdrawal_deadline_seconds)",
        "withdrawalNotReplacedFor",
        "warning",
        "A withdrawal from {{ $labels.namespace }}/{{ $labels.name }} has no replacement yet",
        "An input left more than spec.withdrawal.deadline ago and no revision without it has "
        "been accepted; the composite serves an older revision without it, or nothing. "
        "kubectl describe compositemodel says what holds the replacement.",
    ),
    Alert(
        "MedForgeReconcileErrors",
        "sum by (controller) (rate(controller_runtime_reconcile_errors_total[10m])) > 0",
        "reconcileErrorsFor",
        "warning",
        "The MedForge operator's {{ $labels.controller }} reconciles are failing",
        "Reconcile rounds raise (they are retried with backoff); the operator's log says why.",
    ),
    Alert(
        "MedForgeOperatorDown",
        "absent(max(medforge_operator_leader) == 1)",
        "operatorDownFor",
        "critical",
        "No MedForge operator replica is leading",
        "No replica exports medforge_operator_leader 1: the operator is down, not scraped, "
        "or no replica holds the Lease. Nothing is trained, verified or merged meanwhile.",
    ),
]


def _panel_json(p: Panel, pid: int, x: int, y: int) -> JSON:
    targets = [
        {
            "refId": chr(ord("A") + i),
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "expr": expr,
            "legendFormat": legend,
            "instant": p.kind in ("table", "bargauge", "stat"),
            **({"format": "table"} if p.kind == "table" else {}),
        }
        for i, (expr, legend) in enumerate(p.targets)
    ]
    custom: JSON = {}
    if p.kind == "timeseries":
        custom = {"drawStyle": "line", "lineWidth": 2, "fillOpacity": 10, "spanNulls": True}
        if p.options.get("stack"):
            custom["stacking"] = {"mode": "normal", "group": "A"}
    return {
        "id": pid,
        "type": p.kind,
        "title": p.title,
        "description": p.description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"x": x, "y": y, "w": p.width, "h": p.height},
        "fieldConfig": {"defaults": {"unit": p.unit, "custom": custom}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom"}}
        if p.kind == "timeseries"
        else {},
        "targets": targets,
    }


def _variable(name: str, label: str, query: str) -> JSON:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": {"query": query, "refId": name},
        "definition": query,
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"text": "All", "value": "$__all"},
        "sort": 1,
    }


def dashboard() -> JSON:
    panels: list[JSON] = []
    y = 0
    pid = 1
    for row in ROWS:
        panels.append(
            {
                "id": pid,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
                "panels": [],
            }
        )
        pid += 1
        y += 1
        x = 0
        row_height = 0
        for p in row.panels:
            if x + p.width > 24:
                x, y, row_height = 0, y + row_height, 0
            panels.append(_panel_json(p, pid, x, y))
            pid += 1
            x += p.width
            row_height = max(row_height, p.height)
        y += row_height
    return {
        "uid": DASHBOARD_UID,
        "title": "MedForge",
        "description": "Contributions, composite revisions and scores, durations, "
        "verification and the operator's health.",
        "tags": ["medforge", "kubernetes", "ml"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-24h", "to": "now"},
        "refresh": "1m",
        "timezone": "browser",
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                },
                _variable(
                    "namespace",
                    "Hospital namespace",
                    "label_values(medforge_contribution_phase, namespace)",
                ),
                _variable(
                    "forge_namespace",
                    "Forge namespace",
                    "label_values(medforge_composite_revision, namespace)",
                ),
                _variable(
                    "composite",
                    "Composite",
                    'label_values(medforge_composite_revision{namespace=~"$forge_namespace"}, name)',
                ),
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def alert_rules() -> JSON:
    return {
        "groups": [
            {
                "name": "medforge",
                "rules": [
                    {
                        "alert": a.name,
                        "expr": a.expr,
                        "forValue": a.for_value,
                        "labels": {"severity": a.severity},
                        "annotations": {"summary": a.summary, "description": a.description},
                    }
                    for a in ALERTS
                ],
            }
        ]
    }


def as_all(expr: str, rate_interval: str = "30s") -> str:
    """A dashboard query with its variables filled in as Grafana does for "All"."""
    for var in ("$namespace", "$forge_namespace", "$composite"):
        expr = expr.replace(var, ".*")
    return expr.replace("$__rate_interval", rate_interval)


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of the dashboard."""
    return [(p.title, expr) for row in ROWS for p in row.panels for expr, _ in p.targets]


def rendered() -> dict[str, str]:
    """The chart files, as written."""
    return {
        "dashboard.json": json.dumps(dashboard(), indent=2, sort_keys=True) + "\n",
        "alerts.json": json.dumps(alert_rules(), indent=2, sort_keys=True) + "\n",
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    target = Path(args[0]) if args else CHART_FILES
    target.mkdir(parents=True, exist_ok=True)
    for name, text in rendered().items():
        (target / name).write_text(text)
        print(f"wrote {target / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
