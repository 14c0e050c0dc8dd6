"""The chart's dashboard and alerts are generated from tools.monitoring: the files
in the chart are what the generator writes now, and every query reads a metric the operator
exports (checked against a real Prometheus in tests/cluster/test_monitoring.py)."""

from __future__ import annotations

import json
import re

from tools import monitoring


def test_chart_files_are_generated_and_current() -> None:
    for name, text in monitoring.rendered().items():
        on_disk = (monitoring.CHART_FILES / name).read_text()
        assert on_disk == text, f"helm/medforge/files/{name} is stale: run make generate"


def test_dashboard_is_templated_and_its_panels_do_not_overlap() -> None:
    board = monitoring.dashboard()
    names = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "namespace", "forge_namespace", "composite"} <= names
    cells: set[tuple[int, int]] = set()
    for p in board["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & mine, f"panel {p['title']} overlaps another"
        cells |= mine
    queries = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    # Domain panels follow the dashboard's variables.
    domain = [
        q
        for q in queries
        if "medforge_contribution" in q or "medforge_composite" in q or "medforge_site" in q
    ]
    assert domain and all("$namespace" in q or "$composite" in q for q in domain)
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    json.dumps(board)  # plain JSON


def test_alerts_cover_what_the_platform_team_asked_for() -> None:
    names = {a.name for a in monitoring.ALERTS}
    assert names == {
        "MedForgeContributionStalled",
        "MedForgeCompositeStalled",
        "MedForgeVerificationFailures",
        "MedForgeRevisionRejected",
        "MedForgeNoAcceptedRevision",
        "MedForgeReconcileErrors",
        "MedForgeOperatorDown",
        "MedForgeWithdrawalNotReplaced",
        "MedForgeSiteRegression",
    }
    for a in monitoring.ALERTS:
        assert a.severity in ("info", "warning", "critical")
        # Prometheus templates only name labels the expression keeps.
        kept = (
            set(re.findall(r"by \(([^)]*)\)", a.expr)[0].replace(" ", "").split(","))
            if "by (" in a.expr
            else set()
        )
        for label in re.findall(r"\$labels\.(\w+)", a.summary + a.description):
            assert label in kept, f"{a.name} names $labels.{label} that its expression drops"
