"""Withdrawal (pure functions over the status): which merged inputs left a composite, which
revisions held them, what the composite serves until a replacement without them is accepted, the
replacement's inputs, and when their files may be erased.

An input leaves when its contribution is deleted or no longer consents to (or is no longer
selected by) the composite. Leaving is exact: the replacement is a full merge of the remaining
inputs in their original order, never a subtraction from a revision that saw the input."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Any

from medforge_common.api import InputReason, RevisionState
from medforge_common.api import WithdrawalReason as WR

JSON = dict[str, Any]

# status.withdrawals keeps the newest this many records.
RECORDS_KEPT = 50
REPLACING = "Replacing"  # a replacement without the input is to merge, or merging
ERASING = "Erasing"  # nothing served needs the input's files: erased after the retention
ERASED = "Erased"
DEFAULT_RETENTION = "0s"
DEFAULT_DEADLINE = "1h"
_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def seconds(duration: str) -> int:
    """A duration as the CRD allows it ("0s", "90m", "1d12h") in seconds."""
    m = _DURATION.match(duration.strip())
    if not duration.strip() or m is None:
        raise ValueError(f"{duration!r} is not a duration such as 0s, 30m, 24h or 7d")
    d, h, mi, s = (int(g or 0) for g in m.groups())
    return ((d * 24 + h) * 60 + mi) * 60 + s


def settings(spec: JSON) -> tuple[int, int]:
    """(retention, deadline) in seconds from spec.withdrawal (defaults: erase at once, 1 h)."""
    w = spec.get("withdrawal") or {}
    return (
        seconds(str(w.get("retention") or DEFAULT_RETENTION)),
        seconds(str(w.get("deadline") or DEFAULT_DEADLINE)),
    )


def source(namespace: str, name: str, digest: str) -> str:
    """An input as history entries record it: namespace/name@digest."""
    return f"{namespace}/{name}@{digest}"


def parse_source(text: str) -> tuple[str, str, str] | None:
    ident, sep, digest = str(text).partition("@")
    ns, slash, name = ident.partition("/")
    if not (sep and slash and ns and name and digest):
        return None
    return ns, name, digest


def sources_of(inputs: list[JSON]) -> list[str]:
    """The sources of status.current.inputs-like entries (namespace, name, digest)."""
    return [
        source(str(i["namespace"]), str(i["name"]), str(i["digest"]))
        for i in inputs
        if i.get("namespace") and i.get("name") and i.get("digest")
    ]


def revision_sources(status: JSON, pending: JSON, accepted_inputs: list[JSON] | None) -> list[str]:
    """Every input whose update a finished revision's files hold: an incremental revision holds
    the revision it was merged into too, accepted or not."""
    out = list(pending.get("sources") or [])
    if accepted_inputs is not None:
        out += sources_of(accepted_inputs)
    if pending.get("incremental"):
        out += sources_of((status.get("current") or {}).get("inputs") or [])
    return list(dict.fromkeys(out))


@dataclass(frozen=True)
class Departure:
    namespace: str
    name: str
    digest: str
    reason: str = WR.CONTRIBUTION_DELETED

    @property
    def ident(self) -> str:
        return f"{self.namespace}/{self.name}"


def _held(status: JSON) -> list[tuple[str, str, str]]:
    """(namespace, name, digest) of every input that a served, kept or merging revision holds."""
    found: list[str] = sources_of((status.get("current") or {}).get("inputs") or [])
    for e in status.get("history") or []:
        if e.get("state") != RevisionState.WITHDRAWN:
            found += [str(s) for s in e.get("inputs") or []]
    found += [str(s) for s in (status.get("pendingRevision") or {}).get("sources") or []]
    return [p for s in dict.fromkeys(found) if (p := parse_source(s)) is not None]


def departed(status: JSON, present: set[tuple[str, str]]) -> list[Departure]:
    """Inputs held by some revision whose contribution (namespace, name) no longer consents and
    is no longer selected (`present`: the contributions that do), not recorded yet. A
    contribution that is still present but was retrained keeps its earlier update: retraining is
    no withdrawal."""
    seen = {(w.get("namespace"), w.get("name"), w.get("digest")) for w in _records(status)}
    return [
        Departure(ns, name, digest)
        for ns, name, digest in _held(status)
        if (ns, name) not in present and (ns, name, digest) not in seen
    ]


def _records(status: JSON) -> list[JSON]:
    return [w for w in status.get("withdrawals") or [] if isinstance(w, dict)]


def _holds(entry: JSON, gone: list[Departure]) -> Departure | None:
    """The departure a revision holds; a revision recorded before history entries listed their
    inputs may hold any, and is taken to (it is never served again)."""
    if "inputs" not in entry:
        return gone[0]
    digests = {d.digest for d in gone}
    for s in entry.get("inputs") or []:
        p = parse_source(str(s))
        if p is not None and p[2] in digests:
            return Departure(*p)
    return None


def fallback(history: list[JSON], current: JSON) -> JSON | None:
    """status.current for the newest accepted revision left in the history (after marking), built
    from its entry; None when there is none to serve."""
    uri = str(current.get("uri") or "").rstrip("/")
    if "/" not in uri:
        return None
    for e in history:
        known = "inputs" in e and e.get("digest") and e.get("files")
        if e.get("state") != RevisionState.ACCEPTED or not known:
            continue  # never serve a revision whose inputs are not recorded
        inputs = []
        for s in e.get("inputs") or []:
            if (p := parse_source(str(s))) is not None:
                inputs.append({"namespace": p[0], "name": p[1], "digest": p[2]})
        # Every key of the withdrawn revision's record is blanked (a merge patch keeps what it
        # is not told to remove).
        return {k: None for k in current} | {
            "revision": e["revision"],
            "uri": f"{uri[: uri.rindex('/')]}/rev-{e['revision']}/",
            "digest": e["digest"],
            "files": e["files"],
            "metrics": e.get("metrics") or {},
            "score": e.get("score"),
            "jobName": e.get("jobName"),
            "completedAt": e.get("completedAt"),
            "inputCount": len(inputs),
            "inputs": inputs,
            "fallback": True,
        }
    return None


@dataclass
class Withdrawal:
    """What a round's departures change: status fields, and whether the pending merge (which
    reads a departed input) is to be stopped."""

    changes: JSON
    cancel: bool = False
    # Inputs trained from a revision now withdrawn (spec.startFrom, withdrawal.cascade): they
    # leave the replacement, and their hospitals are told to train again from it.
    cascaded: list[JSON] = field(default_factory=list)


def _mark(
    history: list[JSON], gone: list[Departure], at: str
) -> tuple[list[JSON], dict[str, list[int]]]:
    """(history with every revision that holds a departed input Withdrawn, {digest: revisions})."""
    by_digest = {d.digest: d for d in gone}
    marked: dict[str, list[int]] = {d.digest: [] for d in gone}
    out = []
    for e in history:
        hit = _holds(e, gone) if e.get("state") != RevisionState.WITHDRAWN else None
        if hit is not None:
            d = by_digest[hit.digest]
            e = {
                **e,
                "state": RevisionState.WITHDRAWN,
                "stateBefore": e.get("state"),
                "withdrawnAt": at,
                "withdrawnReason": d.reason,
                "withdrawnInput": d.ident,
            }
            held = {p[2] for s in e.get("inputs") or [] if (p := parse_source(str(s)))}
            for digest in held & set(marked) if "inputs" in e else {d.digest}:
                marked[digest].append(int(e["revision"]))
        out.append(e)
    return out, marked


def _branches_of_withdrawn(history: list[JSON], inputs: list[JSON]) -> list[JSON]:
    """The inputs trained from a revision that is now Withdrawn (spec.startFrom)."""
    gone = {e.get("revision") for e in history if e.get("state") == RevisionState.WITHDRAWN}
    return [
        i
        for i in inputs
        if isinstance(i.get("parent"), dict) and i["parent"].get("revision") in gone
    ]


def withdraw(status: JSON, gone: list[Departure], at: str, cascade: bool = True) -> Withdrawal:
    """Mark every revision that holds a departed input Withdrawn; serve the newest accepted
    revision without it (or nothing); plan the replacement (the remaining inputs of the revision
    served, in their order, less those trained from a withdrawn revision when `cascade`) and
    stop a pending merge that reads it."""
    if not gone:
        return Withdrawal({})
    digests = {d.digest for d in gone}
    history, marked = _mark(status.get("history") or [], gone, at)
    changes: JSON = {"history": history}
    current = status.get("current")
    rebuild = status.get("rebuild")
    cascaded: list[JSON] = []
    if current and any(i.get("digest") in digests for i in current.get("inputs") or []):
        changes["current"] = fallback(history, current)
        remaining = [i for i in current.get("inputs") or [] if i.get("digest") not in digests]
        cascaded = _branches_of_withdrawn(history, remaining) if cascade else []
        left = [i["digest"] for i in remaining if i not in cascaded]
        rebuild = {"inputs": left, "since": at} if left else None
    elif rebuild:
        left = [d for d in rebuild.get("inputs") or [] if d not in digests]
        rebuild = {**rebuild, "inputs": left} if left else None
    changes["rebuild"] = rebuild
    pending = status.get("pendingRevision") or {}
    reads = set(pending.get("inputs") or []) | {
        p[2] for s in pending.get("sources") or [] if (p := parse_source(str(s))) is not None
    }
    if pending.get("incremental"):  # it reads the served revision too
        reads |= {str(i.get("digest")) for i in (current or {}).get("inputs") or []}
    cancel = bool(pending) and bool(reads & digests)
    if cancel:
        changes["pendingRevision"] = None
        for digest in digests & reads:
            marked[digest].append(int(pending["revision"]))
    new_records = [
        {
            "namespace": d.namespace,
            "name": d.name,
            "digest": d.digest,
            "reason": d.reason,
            "at": at,
            "revisions": sorted(set(marked[d.digest])),
            "state": REPLACING if rebuild else ERASING,
            **({} if rebuild else {"erasableSince": at}),
        }
        for d in gone
    ]
    # An earlier withdrawal still waiting for its replacement waits for the new one.
    older = [
        {**w, "state": REPLACING} if w.get("state") == REPLACING and rebuild else _erasable(w, at)
        for w in _records(status)
    ]
    changes["withdrawals"] = [*new_records, *older][:RECORDS_KEPT]
    if cascaded:  # recorded, so that they stay out when the history no longer shows why
        changes["excluded"] = dict(status.get("excluded") or {}) | {
            str(i["digest"]): InputReason.PARENT_WITHDRAWN for i in cascaded
        }
    return Withdrawal(changes, cancel, cascaded)


def _erasable(w: JSON, at: str) -> JSON:
    if w.get("state") != REPLACING:
        return w
    return {**w, "state": ERASING, "erasableSince": at}


def after_replacement(status: JSON, pending: JSON, state: str, at: str) -> JSON:
    """Status fields once a replacement ended: accepted or rejected, the withdrawal is carried
    out (a rejected one leaves the fallback served and its inputs queued as new ones); a failed
    one is retried."""
    if not pending.get("replacement") or state == RevisionState.FAILED:
        return {}
    records = [
        {**_erasable(w, at), **({"replacement": n} if (n := pending.get("revision")) else {})}
        if w.get("state") == REPLACING
        else w
        for w in _records(status)
    ]
    return {"rebuild": None, "withdrawals": records}


def abandon(status: JSON, at: str) -> JSON:
    """Status fields when no remaining input can be merged (each was retrained or failed since):
    nothing to replace with; the inputs come back as new ones when Ready."""
    return after_replacement(status, {"replacement": True, "revision": None}, "", at)


def due(status: JSON, retention: int, now: dt.datetime) -> list[JSON]:
    """Withdrawal records whose files may be erased now."""
    out = []
    for w in _records(status):
        since = _time(w.get("erasableSince"))
        if w.get("state") == ERASING and since and now >= since + dt.timedelta(seconds=retention):
            out.append(w)
    return out


def overdue_seconds(status: JSON, now: dt.datetime) -> float:
    """Seconds the oldest withdrawal still without an accepted replacement has waited (0: none)."""
    waits = [
        (now - t).total_seconds()
        for w in _records(status)
        if w.get("state") == REPLACING and (t := _time(w.get("at"))) is not None
    ]
    return max([0.0, *waits])


def _time(value: Any) -> dt.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def erased(status: JSON, record: JSON, at: str, receipt: str, deleted: int) -> JSON:
    """status.withdrawals with `record` marked erased."""
    out = []
    for w in _records(status):
        if all(w.get(k) == record.get(k) for k in ("namespace", "name", "digest", "at")):
            w = {**w, "state": ERASED, "erasedAt": at, "receipt": receipt, "deleted": deleted}
        out.append(w)
    return {"withdrawals": out}
