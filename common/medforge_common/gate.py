"""The acceptance gate, shared by the merger (which finds whom a regression is due to) and the
operator (which decides on the revision): a task regresses only when the drop of its accuracy
is significant for the size of its set, and a set too small to tell is reported, never gated.

The test is one-sided: with the Agresti-Caffo adjusted proportions (one success and one failure
added to each side), the drop's lower 95 % confidence bound must exceed `maxRegression`. Both
revisions are scored on the same images, so treating them as independent samples only makes the
test more cautious (a paired test would flag slightly smaller drops)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from medforge_common.result import finite_number

Z_ONE_SIDED_95 = 1.6449
DEFAULT_MAX_REGRESSION = 0.05
DEFAULT_MIN_IMAGES_PER_CLASS = 8
DEFAULT_CORROBORATION = 1
# At most this many extra merges find who a regression is due to (leave one new input out
# each); a revision with more new inputs is split in halves by the operator instead.
MAX_BLAME_MERGES = 8


@dataclass(frozen=True)
class Rule:
    max_regression: float = DEFAULT_MAX_REGRESSION
    min_images_per_class: int = DEFAULT_MIN_IMAGES_PER_CLASS
    corroboration: int = DEFAULT_CORROBORATION

    @classmethod
    def from_spec(cls, gate: Any) -> Rule:
        """spec.gate (the CRD bounds each field; anything else falls back to the default)."""
        g = gate if isinstance(gate, dict) else {}
        mr = finite_number(g.get("maxRegression"))
        mi = finite_number(g.get("minImagesPerClass"))
        co = finite_number(g.get("corroboration"))
        return cls(
            DEFAULT_MAX_REGRESSION if mr is None else min(max(mr, 0.0), 1.0),
            DEFAULT_MIN_IMAGES_PER_CLASS if mi is None else max(int(mi), 0),
            DEFAULT_CORROBORATION if co is None else max(int(co), 1),
        )


@dataclass(frozen=True)
class Finding:
    """One task's comparison between the revision replaced and the candidate."""

    task: str
    drop: float  # previous accuracy minus the new one
    lower_bound: float  # of the drop, one-sided 95 %
    samples: int
    gated: bool  # False when the set is below the minimum size
    significant: bool  # a regression the gate acts on


def _figures(m: Any) -> tuple[float, int, int] | None:
    """(accuracy, samples, classes) of one task's metrics, or None when they are not numbers."""
    if not isinstance(m, dict):
        return None
    acc, n = finite_number(m.get("accuracy")), finite_number(m.get("samples"))
    classes = finite_number(m.get("classes"))
    if acc is None or n is None or not (0 <= acc <= 1) or n < 1:
        return None
    return acc, int(n), int(classes) if classes is not None and classes >= 2 else 2


def compare(task: str, previous: Any, new: Any, rule: Rule) -> Finding | None:
    """A task's finding, or None when either side has no usable figures."""
    old, now = _figures(previous), _figures(new)
    if old is None or now is None:
        return None
    (p0, n0, k), (p1, n1, _) = old, now
    a0 = (p0 * n0 + 1) / (n0 + 2)
    a1 = (p1 * n1 + 1) / (n1 + 2)
    se = math.sqrt(a0 * (1 - a0) / (n0 + 2) + a1 * (1 - a1) / (n1 + 2))
    lower = (a0 - a1) - Z_ONE_SIDED_95 * se
    gated = min(n0, n1) >= rule.min_images_per_class * k
    return Finding(
        task,
        round(p0 - p1, 4),
        round(lower, 4),
        min(n0, n1),
        gated,
        gated and lower > rule.max_regression,
    )


def findings(previous: Any, metrics: Any, rule: Rule) -> list[Finding]:
    """Every task scored in both the revision replaced and the candidate, by name."""
    if not isinstance(previous, dict) or not isinstance(metrics, dict):
        return []
    out = []
    for task in sorted(set(previous) & set(metrics)):
        f = compare(str(task), previous[task], metrics[task], rule)
        if f is not None:
            out.append(f)
    return out


def regressed(previous: Any, metrics: Any, rule: Rule) -> set[str]:
    """The tasks that regress significantly."""
    return {f.task for f in findings(previous, metrics, rule) if f.significant}


def verdict(previous: Any, metrics: Any, rule: Rule) -> tuple[bool, str]:
    """(accepted, why): rejected when at least `corroboration` tasks regress significantly."""
    found = findings(previous, metrics, rule)
    bad = [f for f in found if f.significant]
    small = [f.task for f in found if not f.gated and f.drop > rule.max_regression]
    note = f"; {len(small)} task(s) too small to gate ({', '.join(small[:3])})" if small else ""
    if len(bad) >= rule.corroboration:
        worst = max(bad, key=lambda f: f.lower_bound)
        return False, (
            f"{len(bad)} task(s) regressed significantly; task {worst.task} regressed by "
            f"{worst.drop:.3f} (at least {worst.lower_bound:.3f} at 95 %, {worst.samples} "
            f"images), more than gate.maxRegression {rule.max_regression:.3f}{note}"
        )
    if bad:
        return True, (
            f"{len(bad)} task(s) regressed significantly, fewer than gate.corroboration "
            f"{rule.corroboration}{note}"
        )
    return True, f"no task regressed significantly beyond the gate{note}"
