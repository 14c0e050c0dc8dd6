"""The newest copy of every MedForge object the operator's watches delivered.

Fed by the kopf event handlers (every ADDED, MODIFIED and DELETED, our own status writes
included), read by the domain metrics collector at scrape time. Gauges computed from it cannot
drift the way counters bumped in handlers do: a restart rebuilds it from the first list, and a
deleted object's series disappear with it."""

from __future__ import annotations

import threading
from typing import Any

JSON = dict[str, Any]
# Only what the metrics read: a contribution's status may be large (inputs, history), but a
# copy of spec and status per object is small beside what kopf itself keeps.
KEPT_METADATA = ("name", "namespace", "uid", "generation", "creationTimestamp")


def slim(body: JSON) -> JSON:
    meta = body.get("metadata") or {}
    return {
        "metadata": {k: meta[k] for k in KEPT_METADATA if k in meta},
        "spec": body.get("spec") or {},
        "status": body.get("status") or {},
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
                objects[key] = slim(body)

    def snapshot(self) -> dict[str, list[JSON]]:
        with self._lock:
            return {plural: list(objs.values()) for plural, objs in self._objects.items()}
