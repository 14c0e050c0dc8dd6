"""Contributions trained from one of this composite's revisions (spec.startFrom; see
medforge_operator.branching): which it merges, relative to which revision, and how stale."""

from __future__ import annotations

from typing import Any

from medforge_common.api import InputReason as IR
from medforge_common.api import RevisionState
from medforge_operator.bodies import Obj

JSON = dict[str, Any]


def parent_of(c: JSON) -> JSON | None:
    """status.artifact.parent: the revision the operator gave the contribution's Job."""
    parent = ((c.get("status") or {}).get("artifact") or {}).get("parent")
    return parent if isinstance(parent, dict) else None


def staleness(status: JSON, revision: int) -> int:
    """How many accepted revisions the composite served after `revision` (0: it is the one
    served now). Revisions older than the kept history count as accepted: an old parent is
    never taken for a fresher one than it is."""
    current = (status.get("current") or {}).get("revision")
    if current is None or int(current) <= revision:
        return 0
    kept = [e for e in status.get("history") or [] if isinstance(e.get("revision"), int)]
    accepted = {int(e["revision"]) for e in kept if e.get("state") == RevisionState.ACCEPTED}
    newer = len([r for r in accepted if revision < r <= int(current)])
    oldest = min((int(e["revision"]) for e in kept), default=int(current))
    unseen = max(0, oldest - revision - 1)  # trimmed from status.history
    return max(newer + unseen, 1)


def cascades(spec: JSON) -> bool:
    """spec.withdrawal.cascade (default true): branches of a withdrawn revision leave with it."""
    return (spec.get("withdrawal") or {}).get("cascade", True) is not False


def withdrawn(status: JSON, revision: int) -> bool:
    """Whether `revision` was withdrawn: its history entry, or a withdrawal record (kept
    longer than the history) that names it."""
    if any(
        e.get("revision") == revision and e.get("state") == RevisionState.WITHDRAWN
        for e in status.get("history") or []
    ):
        return True
    return any(
        revision in (w.get("revisions") or [])
        for w in status.get("withdrawals") or []
        if isinstance(w, dict)
    )


def _other_revision(status: JSON, parent: JSON) -> bool:
    """The parent names a revision number whose recorded digest is another: a revision of an
    earlier composite of the same name."""
    number, digest = parent.get("revision"), parent.get("digest")
    entries = [*(status.get("history") or []), status.get("current") or {}]
    return any(
        e.get("revision") == number and e.get("digest") not in (None, digest) for e in entries
    )


def refusal(composite: Obj, c: JSON) -> str | None:
    """Why this composite will not merge a branch input, if it will not: another composite's
    revision, a mixture, a parent since withdrawn (cascade), or older than maxStaleness."""
    parent = parent_of(c)
    if parent is None:
        return None
    meta, spec = composite["metadata"], composite.get("spec") or {}
    status = composite.get("status") or {}
    if parent.get("composite") != f"{meta['namespace']}/{meta['name']}":
        return IR.PARENT_ELSEWHERE
    if _other_revision(status, parent):
        return IR.PARENT_ELSEWHERE
    if (spec.get("strategy") or {}).get("type") == "mixture":
        return IR.PARENT_IS_MIXTURE
    revision = int(parent.get("revision") or 0)
    if cascades(spec) and withdrawn(status, revision):
        return IR.PARENT_WITHDRAWN
    most = (spec.get("branches") or {}).get("maxStaleness")
    if most is not None and staleness(status, revision) > int(most):
        return IR.PARENT_TOO_STALE
    return None


def merge_entry(status: JSON, c: JSON) -> JSON | None:
    """The merge plan's parent of a branch input: its revision, digest and staleness."""
    parent = parent_of(c)
    if parent is None:
        return None
    revision = int(parent.get("revision") or 0)
    return {
        "revision": revision,
        "digest": str(parent.get("digest", "")),
        "stale": staleness(status, revision),
    }
