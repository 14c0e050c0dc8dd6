"""What the status commands print, computed from objects alone (pure functions)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from medforge_common.api import CompositePhase, ContributionPhase, RevisionState
from medforge_common.api import ConditionType as C

JSON = dict[str, Any]
BARS = " ▁▂▃▄▅▆▇█"


def condition(obj: JSON, ctype: str) -> JSON:
    return next(
        (c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("type") == ctype),
        {},
    )


def age(stamp: str | None, now: dt.datetime | None = None) -> str:
    if not stamp:
        return "-"
    then = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    secs = int(((now or dt.datetime.now(dt.UTC)) - then).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{secs // size}{unit}"
    return f"{max(secs, 0)}s"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    lines = [headers, *rows]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=False)).rstrip()
        for line in lines
    )


def contribution_row(c: JSON, now: dt.datetime | None = None) -> list[str]:
    meta, st = c["metadata"], c.get("status") or {}
    ready = condition(c, C.READY)
    acc = (st.get("metrics") or {}).get("accuracy")
    return [
        meta.get("namespace", ""),
        meta["name"],
        ((c.get("spec") or {}).get("task") or {}).get("name", ""),
        st.get("phase", ContributionPhase.PENDING),
        ready.get("reason", ""),
        f"{acc:.3f}" if isinstance(acc, int | float) else "-",
        age(meta.get("creationTimestamp"), now),
    ]


def composite_row(c: JSON, now: dt.datetime | None = None) -> list[str]:
    meta, st = c["metadata"], c.get("status") or {}
    current = st.get("current") or {}
    counts = st.get("inputCounts") or {}
    score = current.get("score")
    return [
        meta.get("namespace", ""),
        meta["name"],
        st.get("phase", CompositePhase.WAITING),
        str(current.get("revision", "-")),
        f"{score:.3f}" if isinstance(score, int | float) else "-",
        f"{counts.get('Included', 0)}/{counts.get('Pending', 0)}/{counts.get('Excluded', 0)}",
        condition(c, C.READY).get("reason", ""),
        age(meta.get("creationTimestamp"), now),
    ]


CONTRIBUTION_HEADERS = ["NAMESPACE", "NAME", "TASK", "PHASE", "REASON", "ACCURACY", "AGE"]
COMPOSITE_HEADERS = [
    "NAMESPACE",
    "NAME",
    "PHASE",
    "REVISION",
    "SCORE",
    "IN/PEND/EXCL",
    "REASON",
    "AGE",
]


def sparkline(values: list[float]) -> str:
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = hi - lo or 1.0
    return "".join(BARS[1 + round((v - lo) / span * (len(BARS) - 2))] for v in values)


def task_scores(c: JSON) -> dict[str, list[tuple[int, float]]]:
    """Per task, (revision, accuracy) over the accepted revisions in the kept history and the
    served one, oldest first."""
    st = c.get("status") or {}
    revisions: dict[int, JSON] = {}
    for h in st.get("history") or []:
        if h.get("state") == RevisionState.ACCEPTED and isinstance(h.get("metrics"), dict):
            revisions[int(h["revision"])] = h["metrics"]
    current = st.get("current") or {}
    if current.get("revision") is not None:
        revisions[int(current["revision"])] = current.get("metrics") or {}
    out: dict[str, list[tuple[int, float]]] = {}
    for rev in sorted(revisions):
        for task, m in (revisions[rev] or {}).items():
            acc = (m or {}).get("accuracy") if isinstance(m, dict) else None
            if isinstance(acc, int | float):
                out.setdefault(str(task), []).append((rev, float(acc)))
    return out


def describe_composite(c: JSON, now: dt.datetime | None = None) -> str:
    meta, spec, st = c["metadata"], c.get("spec") or {}, c.get("status") or {}
    current = st.get("current") or {}
    ready = condition(c, C.READY)
    lines = [
        f"CompositeModel {meta.get('namespace')}/{meta['name']}",
        f"  base model:   {(spec.get('baseModel') or {}).get('name', '-')}",
        f"  strategy:     {(spec.get('strategy') or {}).get('type', 'fusion')}"
        f" ({spec.get('integration', 'full')})",
        f"  phase:        {st.get('phase', 'Waiting')} ({ready.get('reason', '')}: "
        f"{ready.get('message', '')})",
        f"  serving:      revision {current.get('revision', '-')}"
        + (
            f", score {current['score']:.3f}"
            if isinstance(current.get("score"), int | float)
            else ""
        )
        + (f", digest {current['digest'][:19]}..." if current.get("digest") else ""),
        "",
        "Revisions (newest first):",
    ]
    rows = [
        [
            str(h.get("revision", "")),
            str(h.get("state", "")),
            str(h.get("withdrawnReason") or h.get("reason", "")),
            f"{h['score']:.3f}" if isinstance(h.get("score"), int | float) else "-",
            age(h.get("completedAt"), now),
            (
                f"held {h.get('withdrawnInput', '?')}, withdrawn {age(h.get('withdrawnAt'), now)}"
                " ago"
                if h.get("state") == "Withdrawn"
                else str(h.get("message", ""))
            )[:60],
        ]
        for h in st.get("history") or []
    ]
    lines.append(
        table(["REVISION", "STATE", "REASON", "SCORE", "AGE", "MESSAGE"], rows)
        if rows
        else "  none yet"
    )
    lines += _withdrawals(st, now)
    lines += site_matrix(st)
    lines += ["", "Inputs:"]
    inputs = [
        [
            f"{i.get('namespace', '')}/{i.get('name', '')}",
            str(i.get("state", "")),
            str(i.get("reason", "")),
            str(i.get("task", "")),
        ]
        for i in st.get("inputs") or []
    ]
    lines.append(table(["CONTRIBUTION", "STATE", "REASON", "TASK"], inputs) if inputs else "  none")
    if st.get("inputsOmitted"):
        lines.append(f"  ... and {st['inputsOmitted']} more")
    lines += _scores(c, current)
    return "\n".join(lines)


SITE_CELLS = {"TooSmall": "too small", "NotReported": "no report", "Failed": "failed"}


def site_matrix(st: JSON, revisions: int = 6) -> list[str]:
    """Revision x site: each site's accuracy of the candidate on its own images (the served
    revision's in brackets), newest revision first; a candidate still at the sites too."""
    pending = st.get("pendingRevision") or {}
    scored = [
        (str(h.get("revision")), h.get("sites") or [])
        for h in st.get("history") or []
        if h.get("sites")
    ]
    if (pending.get("evaluation") or {}).get("sites"):
        scored.insert(0, (f"{pending['revision']}*", pending["evaluation"]["sites"]))
    scored = scored[:revisions]
    if not scored:
        return []
    names = sorted({str(x.get("site")) for _, sites in scored for x in sites})
    rows = []
    for name in names:
        row = [name]
        for _, sites in scored:
            x = next((x for x in sites if x.get("site") == name), None)
            row.append(_site_cell(x))
        rows.append(row)
    head = ["SITE", *[f"REV {r}" for r, _ in scored]]
    note = "  (accuracy on the site's own images; the served revision's in brackets; * scoring)"
    return ["", "Sites (revision x site):", table(head, rows), note]


def _site_cell(x: JSON | None) -> str:
    if x is None:
        return "-"
    state = str(x.get("state", ""))
    cand, served = x.get("candidate") or {}, x.get("served") or {}
    if state != "Reported" or not isinstance(cand.get("accuracy"), int | float):
        return SITE_CELLS.get(state, state.lower() or "-")
    cell = f"{cand['accuracy']:.3f}"
    if isinstance(served.get("accuracy"), int | float):
        cell += f" ({served['accuracy']:.3f})"
    return f"{cell} n={cand.get('samples', '?')}"


def _withdrawals(st: JSON, now: dt.datetime | None) -> list[str]:
    """Inputs that left: which revisions they took with them and where the erasure stands."""
    rows = [
        [
            f"{w.get('namespace', '')}/{w.get('name', '')}",
            str(w.get("reason", "")),
            age(w.get("at"), now),
            ",".join(str(n) for n in w.get("revisions") or []) or "-",
            str(w.get("replacement", "-")),
            str(w.get("state", "")),
        ]
        for w in st.get("withdrawals") or []
    ]
    if not rows:
        return []
    headers = ["INPUT", "REASON", "AGE", "WITHDRAWN REVISIONS", "REPLACED BY", "STATE"]
    return ["", "Withdrawals (newest first):", table(headers, rows)]


def _scores(c: JSON, current: JSON) -> list[str]:
    """The served revision's metrics per task, and each task's accuracy over revisions."""
    lines: list[str] = []
    metrics = current.get("metrics") or {}
    if metrics:
        lines += ["", "Metrics of the served revision:"]
        names = sorted({k for m in metrics.values() if isinstance(m, dict) for k in m})
        lines.append(
            table(
                ["TASK", *[n.upper() for n in names]],
                [[t, *[_fmt((m or {}).get(n)) for n in names]] for t, m in sorted(metrics.items())],
            )
        )
    scores = task_scores(c)
    if scores:
        lines += ["", "Accuracy per task over revisions:"]
        for task, points in sorted(scores.items()):
            vals = [v for _, v in points]
            lines.append(
                f"  {task:<20} {sparkline(vals)}  r{points[0][0]} {vals[0]:.3f} -> "
                f"r{points[-1][0]} {vals[-1]:.3f}"
            )
    return lines


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v if v is not None else "-")
