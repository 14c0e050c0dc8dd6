"""The dashboard and the alerts against a real Prometheus scraping the operator: every panel's
query returns data, the chart's PrometheusRule passes `promtool check rules`, and a stalled
contribution fires its alert (read back through Prometheus's alerts API)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from medforge_localcluster import binaries
from tests.builders import contribution
from tests.cluster.conftest import ROOT, Forge, OperatorProcess, base_model, free_port
from tests.cluster.test_composite import composite_doc, revision_state
from tests.cluster.test_composite import contribution as shared_contribution
from tests.cluster.test_operator import wait_phase
from tests.conftest import ClusterAccess
from tests.helpers import wait_until
from tools import monitoring

CHART = ROOT / "helm" / "medforge"
# Short waits, so that the alerts fire within the test; the chart's defaults are minutes.
FAST_ALERTS = {
    "stalledFor": "5s",
    "verificationFailuresFor": "0s",
    "revisionRejectedFor": "0s",
    "noAcceptedRevisionFor": "0s",
    "reconcileErrorsFor": "0s",
    "operatorDownFor": "0s",
}


def chart_rules(tmp: Path) -> Path:
    """The chart's PrometheusRule as Prometheus loads it (a rules file of its groups)."""
    helm = binaries.ensure(["helm"], log=False)["helm"]
    sets = [f"--set=monitoring.alerts.{k}={v}" for k, v in FAST_ALERTS.items()]
    out = subprocess.run(
        [
            str(helm),
            "template",
            "medforge",
            str(CHART),
            "--set=store.endpoint=https://s3.example.org",
            "--set=monitoring.prometheusRule.enabled=true",
            *sets,
            "--show-only=templates/prometheusrule.yaml",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    rule = yaml.safe_load(out)
    assert rule["kind"] == "PrometheusRule"
    path = tmp / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    return path


@dataclass
class Prometheus:
    url: str

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = requests.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert body.get("status") == "success", f"{expr}: {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def alerts(self) -> list[dict[str, Any]]:
        r = requests.get(f"{self.url}/api/v1/alerts", timeout=10)
        alerts: list[dict[str, Any]] = r.json()["data"]["alerts"]
        return alerts


@pytest.fixture
def prometheus(operator: OperatorProcess, tmp_path: Path) -> Iterator[Prometheus]:
    paths = binaries.ensure(["prometheus", "promtool"], log=False)
    rules = chart_rules(tmp_path)
    check = subprocess.run(
        [str(paths["promtool"]), "check", "rules", str(rules)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"{len(monitoring.ALERTS)} rules found" in check.stdout, check.stdout
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [
            {
                "job_name": "medforge-operator",
                "honor_labels": True,
                "static_configs": [{"targets": [f"127.0.0.1:{operator.metrics_port}"]}],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            str(paths["prometheus"]),
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            try:
                return requests.get(f"{url}/-/ready", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(ready, 60, every=0.5, what="Prometheus to be ready")
        yield Prometheus(url)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


METRIC = re.compile(r"\b((?:medforge|controller_runtime|workqueue)_[a-z_]+)")


def test_dashboard_and_alerts_against_a_real_prometheus(
    cluster: ClusterAccess,
    namespace: str,
    forge_namespace: str,
    forge: Forge,
    prometheus: Prometheus,
    tmp_path: Path,
) -> None:
    base = base_model(cluster, forge, "clip-monitoring")
    # A data-protection officer's budget (on a dataset nobody trains on here): the budget panel.
    budget = {
        "apiVersion": "medforge.io/v1alpha1",
        "kind": "PrivacyBudget",
        "metadata": {"name": "archive"},
        "spec": {"dataset": {"uri": "s3://archive/scans/"}, "epsilon": 8, "delta": 1e-5},
    }
    cluster.apply(namespace, json.dumps(budget))
    cluster.apply(namespace, shared_contribution("seen", base))
    # Stalled: the base model it names is not registered.
    cluster.apply(namespace, contribution("stuck", ("no-such-model", "")))
    wait_phase(cluster, namespace, "seen", "Succeeded", 120)
    # The hospital scores each candidate on its own images: the sites' panels and alert.
    site = {
        "apiVersion": "medforge.io/v1alpha1",
        "kind": "EvaluationSet",
        "metadata": {"name": "held-out"},
        "spec": {
            "task": {"name": "breakhis", "classes": ["benign", "malignant"]},
            "dataset": {"uri": "s3://site-data/ok/"},
            "forges": [f"{forge_namespace}/forge"],
        },
    }
    cluster.apply(namespace, json.dumps(site))
    comp = composite_doc(base, None, minContributions=1, integration="incremental")
    cluster.apply(forge_namespace, comp)
    revision_state(cluster, forge_namespace, 1, "Accepted")
    cluster.apply(namespace, shared_contribution("more", base, task="derm"))
    revision_state(cluster, forge_namespace, 2, "Accepted")
    # A poisoned input alone in a revision: rejected, revision 2 stays served.
    cluster.apply(namespace, shared_contribution("poison", base, task="reject-me"))
    revision_state(cluster, forge_namespace, 3, "Rejected")

    # The domain state reached Prometheus: the served revision and the trainer's figures.
    def scraped() -> list[dict[str, Any]] | None:
        got = prometheus.query(
            f'medforge_composite_last_revision_outcome{{namespace="{forge_namespace}", '
            'name="forge", state="Rejected"} == 3'
        )
        return got or None

    wait_until(scraped, 60, every=1, what="the rejected revision in Prometheus")
    served = prometheus.query(f'medforge_composite_revision{{namespace="{forge_namespace}"}}')
    assert served and float(served[0]["value"][1]) == 2
    ips = prometheus.query(
        f'medforge_contribution_images_per_second{{namespace="{namespace}", name="seen"}}'
    )
    assert ips and float(ips[0]["value"][1]) == 250.0
    evaluations = prometheus.query(
        f'medforge_composite_search_evaluations{{namespace="{forge_namespace}"}}'
    )
    assert evaluations and float(evaluations[0]["value"][1]) == 40

    # Every panel's query returns data (rates need a few scrapes: wait for each).
    empty = []
    for title, expr in monitoring.panel_queries():
        try:
            wait_until(partial(prometheus.query, monitoring.as_all(expr)), 30, every=1)
        except AssertionError:
            empty.append(f"{title}: {expr}")
    assert not empty, "panels without data:\n" + "\n".join(empty)

    # Every series an alert reads exists (an alert on a misspelt metric would never fire).
    for rule in monitoring.ALERTS:
        for name in set(METRIC.findall(rule.expr)):
            assert prometheus.query(f"count({name})"), f"{rule.name}: no series {name}"
    assert prometheus.query("max(medforge_operator_leader) == 1")  # OperatorDown stays quiet

    # The stalled contribution fires its alert, with its name and reason.
    def firing() -> dict[str, Any] | None:
        for a in prometheus.alerts():
            labels = a["labels"]
            if (
                labels.get("alertname") == "MedForgeContributionStalled"
                and labels.get("name") == "stuck"
                and a["state"] == "firing"
            ):
                return a
        return None

    alert = wait_until(firing, 60, every=1, what="MedForgeContributionStalled to fire")

    def rejected() -> dict[str, Any] | None:
        return next(
            (
                a
                for a in prometheus.alerts()
                if a["labels"].get("alertname") == "MedForgeRevisionRejected"
                and a["labels"].get("namespace") == forge_namespace
                and a["state"] == "firing"
            ),
            None,
        )

    assert wait_until(rejected, 30, every=1)["labels"]["reason"] == "NoUsableInput"
    assert alert["labels"]["namespace"] == namespace
    assert alert["labels"]["reason"] == "BaseModelNotFound"
    assert "stuck" in alert["annotations"]["summary"]
    # The healthy contribution does not fire.
    assert not any(
        a["labels"].get("alertname") == "MedForgeContributionStalled"
        and a["labels"].get("name") == "seen"
        for a in prometheus.alerts()
    )

    if target := os.environ.get("MEDFORGE_DASHBOARD_PNG"):
        from tests.dashboard_preview import render

        render(prometheus.url, Path(target), time.time() - 300, time.time())
    (tmp_path / "alerts.json").write_text(json.dumps(prometheus.alerts(), indent=1))
