"""The newest copy of every MedForge object the operator's watches delivered.

Fed by the kopf event handlers (every ADDED, MODIFIED and DELETED, our own status writes
included), read by the domain metrics collector at scrape time. Gauges computed from it cannot
drift the way counters bumped in handlers do: a restart rebuilds it from the first list, and a
deleted object's series disappear with it."""

from __future__ import annotations

import threading
from typing import Any

JSON = dict[str, Any]
# Only what the metrics read. A member namespace's objects are the tenants' to write: keeping
# whole copies of every contribution cluster-wide would let them grow the operator's memory, so
# a contribution keeps its task name and the status fields the metrics use (status is the
# operator's own, bounded by what it writes).
KEPT_METADATA = ("name", "namespace", "uid", "generation", "creationTimestamp")
KEPT_STATUS = {
    "loracontributions": ("phase", "conditions", "training", "metrics", "job"),
    "compositemodels": (
        "phase",
        "conditions",
        "current",
        "revision",
        "inputCounts",
        "history",
        "excluded",
        "isolation",
    ),
    "basemodels": ("phase", "conditions", "sizeBytes"),
    "privacybudgets": ("spent", "remaining"),
}


def slim(body: JSON, plural: str = "") -> JSON:
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    spec = body.get("spec") or {}
    kept = KEPT_STATUS.get(plural)
    if kept is not None:
        status = {k: status[k] for k in kept if k in status}
    if plural == "loracontributions":
        task = spec.get("task") or {}
        spec = {"task": {"name": task.get("name")}} if isinstance(task, dict) else {}
    return {
        "metadata": {k: meta[k] for k in KEPT_METADATA if k in meta},
        "spec": spec,
        "status": status,
    }


class ObservedObjects:
    def __init__(self) -> None:
        self._objects: dict[str, dict[tuple[str, str], JSON]] = {}
        self._lock = threading.Lock()

    def observe(self, plural: str, event_type: str, body: JSON) -> None:
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
        with self._lock:
            objects = self._objects.setdefault(plural, {})
            if event_type == "DELETED":
                objects.pop(key, None)
            else:
                objects[key] = slim(body, plural)

    def snapshot(self) -> dict[str, list[JSON]]:
        with self._lock:
            return {plural: list(objs.values()) for plural, objs in self._objects.items()}
