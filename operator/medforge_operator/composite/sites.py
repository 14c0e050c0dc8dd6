"""The site gate (pure): a candidate revision that passed the summary-set gate is scored by every
consenting hospital on its own held-out images (EvaluationSet), beside the served revision, and
accepted only when no reporting site regresses significantly beyond spec.gate.sites.maxRegression.

The worst site decides, not the mean; the test of significance is the summary gate's
(medforge_common.gate: the lower 95 % bound of the drop, for the site's sample count), and
gate.corroboration hospitals must regress before a candidate is rejected, so that one small or
adversarial site can be kept from vetoing. A site below its set's minSamples is "TooSmall": it answered,
counts toward the quorum, and none of its figures is kept.

status.pendingRevision.evaluation holds the state between rounds:
{startedAt, deadline, result (the merge's, as settle needs it), sites: [{site, namespace, name,
task, minSamples, state, jobUid, candidate, served, reportedAt}]}."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from medforge_common import gate as gate_rule
from medforge_common.api import Reason as R
from medforge_common.result import finite_number
from medforge_operator.composite.withdrawal import seconds

JSON = dict[str, Any]
DEFAULT_TIMEOUT = "1h"
# Half the hospitals: one that stays silent delays a candidate by the timeout, never halts it.
DEFAULT_QUORUM = "50%"
DEFAULT_MIN_SAMPLES = 20
SITES_SHOWN = 50  # per revision, in history (and in the metric's label set)
FIGURES = ("accuracy", "f1", "auc", "samples", "classes")
HEADLINE = ("accuracy", "f1", "auc", "samples")  # what history keeps of each site

# A site's state in a candidate's evaluation.
PENDING = "Pending"  # its Job is not made yet, or runs
REPORTED = "Reported"
TOO_SMALL = "TooSmall"  # fewer images than the set's minSamples: no figures leave
FAILED = "Failed"  # its Job failed (its data, its credentials): not reported
NOT_REPORTED = "NotReported"  # no answer by the timeout
ANSWERED = (REPORTED, TOO_SMALL, FAILED)


@dataclass(frozen=True)
class SiteRule:
    quorum: float  # a count (>= 1) or a fraction of the consenting sites (< 1)
    max_regression: float
    timeout: int  # seconds
    corroboration: int

    @classmethod
    def from_spec(cls, gate: Any) -> SiteRule:
        """spec.gate.sites (and gate.corroboration). quorum: an integer count, or a string
        "60%" (a fraction of the consenting sites); the CRD bounds both."""
        g = gate if isinstance(gate, dict) else {}
        raw_sites = g.get("sites")
        s: JSON = raw_sites if isinstance(raw_sites, dict) else {}
        q: Any = s.get("quorum", DEFAULT_QUORUM)
        if isinstance(q, str) and q.endswith("%"):
            try:
                share = min(max(float(q[:-1]) / 100.0, 0.0), 1.0)
            except ValueError:
                share = 1.0
            quorum = share if share < 1 else 1e9  # 100 %: every site
        else:
            quorum = max(1.0, float(finite_number(q) or 1))
        mr = finite_number(s.get("maxRegression"))
        co = finite_number(g.get("corroboration"))
        return cls(
            quorum,
            gate_rule.DEFAULT_MAX_REGRESSION if mr is None else min(max(mr, 0.0), 1.0),
            _timeout(s.get("timeout")),
            gate_rule.DEFAULT_CORROBORATION if co is None else max(int(co), 1),
        )

    def needed(self, sites: int) -> int:
        """How many sites must answer; never more than there are."""
        if sites == 0:
            return 0
        if self.quorum < 1:
            return max(1, math.ceil(self.quorum * sites - 1e-9))
        return min(sites, int(self.quorum))


MAX_TIMEOUT = 30 * 86400


def _timeout(value: Any) -> int:
    """gate.sites.timeout in seconds, at most 30 days (the CRD's pattern allows any digits)."""
    try:
        return min(seconds(str(value or DEFAULT_TIMEOUT)), MAX_TIMEOUT)
    except (ValueError, OverflowError):
        return seconds(DEFAULT_TIMEOUT)


@dataclass
class Decision:
    done: bool
    accepted: bool = False
    reason: str = ""  # SiteRegression or QuorumNotReached when rejected
    message: str = ""
    regressed: list[str] = field(default_factory=list)  # site codes


def figures(raw: Any) -> JSON | None:
    """The aggregate figures of one model on a site, finite numbers only; None when unusable."""
    if not isinstance(raw, dict):
        return None
    out: JSON = {}
    for k in FIGURES:
        v = finite_number(raw.get(k))
        if v is not None:
            out[k] = int(v) if k in ("samples", "classes") else round(float(v), 6)
    recall = raw.get("recall")
    if isinstance(recall, dict):
        out["recall"] = {
            str(c)[:63]: round(v, 6)
            for c, raw_r in list(recall.items())[:100]
            if (v := finite_number(raw_r)) is not None
        }
    acc, n = out.get("accuracy"), out.get("samples")
    if acc is None or n is None or not 0 <= acc <= 1 or n < 1:
        return None
    return out


def report(site: JSON, raw: Any, at: str) -> JSON:
    """A site's record once its result arrived. The operator applies the set's minSamples
    itself: a result below it keeps no figure, whatever the evaluator sent."""
    out: JSON = {
        k: site[k] for k in ("site", "namespace", "name", "task", "minSamples", "uid") if k in site
    }
    out["reportedAt"] = at
    cand = figures(raw.get("candidate")) if isinstance(raw, dict) else None
    small = isinstance(raw, dict) and raw.get("state") == TOO_SMALL
    if small or (cand is not None and cand["samples"] < int(site.get("minSamples", 1))):
        return out | {"state": TOO_SMALL}
    if cand is None:
        return out | {"state": FAILED, "message": "the evaluation reported no usable figures"}
    served = figures(raw.get("served"))
    if served is not None and served["samples"] != cand["samples"]:
        served = None  # not scored on the same images: nothing to compare
    seen = finite_number(raw.get("overlap"))
    return out | {
        "state": REPORTED,
        "candidate": cand,
        **({"served": served} if served else {}),
        **({"overlap": int(seen)} if seen is not None and seen > 0 else {}),
    }


def finding(site: JSON, rule: SiteRule) -> gate_rule.Finding | None:
    """The site's comparison of the candidate with the served revision, on its own images."""
    if site.get("state") != REPORTED or not site.get("served"):
        return None
    per_site = gate_rule.Rule(rule.max_regression, 0, rule.corroboration)
    return gate_rule.compare(str(site.get("task")), site["served"], site["candidate"], per_site)


def hospital(site: JSON) -> str:
    """Quorum and corroboration count hospitals (namespaces), not sets: a hospital with many
    sets neither fills the quorum nor corroborates a regression alone."""
    return str(site.get("namespace") or site.get("site"))


def decide(evaluation: JSON, rule: SiteRule, at: str) -> Decision:
    """Whether the candidate's evaluation is over, and its verdict (`at` is now, RFC 3339)."""
    sites = [s for s in evaluation.get("sites") or [] if isinstance(s, dict)]
    found = [(s, f) for s in sites if (f := finding(s, rule)) is not None]
    bad = sorted(((s, f) for s, f in found if f.significant), key=lambda p: -p[1].lower_bound)
    bad_hospitals = {hospital(s) for s, _ in bad}
    if len(bad_hospitals) >= rule.corroboration:
        s, f = bad[0]
        return Decision(
            True,
            False,
            R.SITE_REGRESSION,
            f"{len(bad_hospitals)} hospital(s) regressed significantly; site {s['site']} (task "
            f"{f.task}) dropped by {f.drop:.3f} (at least {f.lower_bound:.3f} at 95 %, "
            f"{f.samples} images) against the served revision, more than "
            f"gate.sites.maxRegression {rule.max_regression:.3f}",
            [str(s["site"]) for s, _ in bad],
        )
    hospitals = sorted({hospital(s) for s in sites})
    answered = [
        h
        for h in hospitals
        if all(s.get("state") in (REPORTED, TOO_SMALL) for s in sites if hospital(s) == h)
    ]
    need = rule.needed(len(hospitals))
    everyone = all(s.get("state") in ANSWERED for s in sites)
    if not everyone and at < str(evaluation.get("deadline") or ""):
        return Decision(False)
    if len(answered) < need:
        return Decision(
            True,
            False,
            R.QUORUM_NOT_REACHED,
            f"{len(answered)} of {len(hospitals)} hospital(s) reported by the timeout, "
            f"gate.sites.quorum needs {need}; the next arrival makes a new candidate",
        )
    quiet = len(hospitals) - len(answered)
    note = [f"{len(answered)} of {len(hospitals)} hospital(s) reported"]
    if bad:
        note.append(
            f"{len(bad_hospitals)} regressed, fewer than gate.corroboration {rule.corroboration}"
        )
    if quiet:
        note.append(f"{quiet} did not")
    return Decision(True, True, "", "no site regressed significantly: " + ", ".join(note))


def _headline(site: JSON, keys: tuple[str, ...]) -> JSON:
    """The record with only `keys` of its candidate's and served revision's figures."""
    out = dict(site)
    for side in ("candidate", "served"):
        if isinstance(out.get(side), dict):
            out[side] = {k: v for k, v in out[side].items() if k in keys}
    return out


def compact(site: JSON) -> JSON:
    """A site's record as the forge's status keeps it: headline figures, no per-class recall
    (that stays in the set's own status, in the hospital's namespace)."""
    return _headline(site, (*HEADLINE, "classes"))


def settled_sites(evaluation: JSON) -> list[JSON]:
    """The sites as history keeps them once the candidate is decided: a site still pending is
    NotReported; at most SITES_SHOWN, the headline figures only where they were reported."""
    out = []
    for s in (evaluation.get("sites") or [])[:SITES_SHOWN]:
        keep = _headline(
            {k: s[k] for k in ("site", "task", "state", "candidate", "served") if k in s},
            HEADLINE,
        )
        if keep.get("state") not in ANSWERED:
            keep["state"] = NOT_REPORTED
        out.append(keep)
    return out
