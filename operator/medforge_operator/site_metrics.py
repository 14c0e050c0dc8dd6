"""`medforge_site_metric{composite,site,task,metric}`: what the newest candidate scored on each
hospital's own images (status.history[].sites), computed at scrape time like every domain
metric. Bounded: one composite's newest scored revision, at most sites.SITES_SHOWN sites, a
fixed set of metric names; a site below its minSamples has no figures, so no series."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

from medforge_common.api import Reason as R
from medforge_common.result import finite_number

JSON = dict[str, Any]
FIGURES = ("accuracy", "f1", "auc", "samples")


def site_families(composites: list[JSON]) -> Iterator[Metric]:
    g = GaugeMetricFamily(
        "medforge_site_metric",
        "The newest scored candidate on each site's own images: accuracy, f1, auc, samples, "
        "served_accuracy (the served revision on the same images), drop (served minus "
        "candidate accuracy), regressed (1 when the site rejected it), revision",
        labels=["composite", "site", "task", "metric"],
    )
    for c in composites:
        meta, status = c.get("metadata") or {}, c.get("status") or {}
        me = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
        scored = next((h for h in status.get("history") or [] if h.get("sites")), None)
        if scored is None:
            continue
        regressed = scored.get("reason") == R.SITE_REGRESSION
        for site in scored["sites"][:50]:
            cand, served = site.get("candidate") or {}, site.get("served") or {}
            if not isinstance(cand, dict) or finite_number(cand.get("accuracy")) is None:
                continue
            labels = [me, str(site.get("site")), str(site.get("task"))]
            values: dict[str, float | None] = {k: finite_number(cand.get(k)) for k in FIGURES}
            values["revision"] = finite_number(scored.get("revision"))
            before = finite_number(served.get("accuracy")) if isinstance(served, dict) else None
            if before is not None:
                values["served_accuracy"] = before
                drop = before - (values["accuracy"] or 0.0)
                values["drop"] = round(drop, 6)
                values["regressed"] = 1.0 if regressed and drop > 0 else 0.0
            for metric, v in values.items():
                if v is not None:
                    g.add_metric([*labels, metric], v)
    yield g
