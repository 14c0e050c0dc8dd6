"""The one status writer of every reconciler: compare, then a merge patch that blanks the keys
the new status dropped (a merge patch removes a key only when told to)."""

from __future__ import annotations

from typing import Any

from medforge_operator.bodies import Obj
from medforge_operator.kubeapi import KubeApi

JSON = dict[str, Any]


def apply_changes(status: JSON, changes: JSON) -> JSON:
    """A status with a round's changes applied; a None value removes the field."""
    out = {**status, **changes}
    return {k: v for k, v in out.items() if v is not None}


def status_changed(old: JSON, new: JSON) -> bool:
    """Compare ignoring kopf's own bookkeeping in status."""
    keys = set(new) | (set(old) - {"kopf"})
    return any(old.get(k) != new.get(k) for k in keys)


# Status fields another reconciler writes too (the composites record themselves in a
# contribution's usedBy): sent only when this round changed them, never written back stale.
SHARED_FIELDS = frozenset({"usedBy"})


def _nested(old: Any, new: Any) -> Any:
    """`new` as a merge patch over `old`: inside objects too, a key `new` dropped is blanked
    (a merge patch merges nested objects, so a new pendingRevision would otherwise keep the
    previous one's fields)."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return new
    return {k: _nested(old.get(k), v) for k, v in new.items()} | {
        k: None for k in old if k not in new
    }


def status_patch(old: JSON, new: JSON) -> JSON:
    kept = {
        k: _nested(old.get(k), v)
        for k, v in new.items()
        if k not in SHARED_FIELDS or old.get(k) != v
    }
    return {**kept, **{k: None for k in set(old) - set(new) - {"kopf"} - SHARED_FIELDS}}


def write_status(
    kube: KubeApi, plural: str, obj: Obj, old: JSON, new: JSON, compare_and_swap: bool = False
) -> bool:
    """Patch the status when it changed; whether it did. With `compare_and_swap`, the patch
    names the resourceVersion read, so a write by anyone since is never lost (a conflict)."""
    if not status_changed(old, new):
        return False
    meta = obj["metadata"]
    version = meta.get("resourceVersion") if compare_and_swap else None
    kube.patch_status(
        plural, meta.get("namespace") or "", meta["name"], status_patch(old, new), version
    )
    return True
