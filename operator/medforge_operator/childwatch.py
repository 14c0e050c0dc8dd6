"""Watches of the operator's Jobs and their pods, selected by label on the server.

kopf watches a resource whole and filters labels in the operator, so following pods through kopf
means receiving every pod of the cluster and paying kopf's per-event bookkeeping for each. These
watches ask the API server for the operator's children only, read the stream as plain JSON, and
only queue the owner: the reconcile round reads what it needs.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes.client.exceptions import ApiException

from medforge_operator.kube import TIMEOUT, Kube

JSON = dict[str, Any]
# The server ends each watch after 240 s and sends bookmarks meanwhile; a read that waits
# longer than this means the connection is dead.
WATCH_TIMEOUT = (5.0, 300.0)
log = logging.getLogger("medforge.childwatch")
# What a child event reports: (kind "Job"|"Pod", event type, namespace, labels, object). The
# event type is the watch's (ADDED, MODIFIED, DELETED), or ADDED for an item of a fresh listing.
OnEvent = Callable[[str, str, str, dict[str, str], JSON], None]


class ChildWatch(threading.Thread):
    def __init__(self, kube: Kube, kind: str, namespace: str | None, selector: str,
                 on_event: OnEvent, stop: threading.Event) -> None:  # fmt: skip
        super().__init__(name=f"watch-{kind.lower()}-{namespace or 'all'}", daemon=True)
        self.kube, self.kind, self.namespace, self.selector = kube, kind, namespace, selector
        self.on_event, self.stop = on_event, stop

    def _call(self, **kw: Any) -> Any:
        batch, core = self.kube.batch, self.kube.core
        if self.kind == "Job":
            if self.namespace:
                return batch.list_namespaced_job(self.namespace, **kw)
            return batch.list_job_for_all_namespaces(**kw)
        if self.namespace:
            return core.list_namespaced_pod(self.namespace, **kw)
        return core.list_pod_for_all_namespaces(**kw)

    def _deliver(self, etype: str, obj: JSON) -> None:
        meta = obj.get("metadata") or {}
        try:
            labels = meta.get("labels") or {}
            self.on_event(self.kind, etype, meta.get("namespace", ""), labels, obj)
        except Exception:
            log.exception("handling a %s event failed", self.kind)

    def _list(self) -> str:
        """List first: whatever changed while nobody watched gets a round too. Returns the
        resourceVersion to watch from."""
        listing = json.loads(
            self._call(
                label_selector=self.selector, _preload_content=False, _request_timeout=TIMEOUT
            ).data
        )
        for item in listing["items"]:
            self._deliver("ADDED", item)
        return str(listing["metadata"]["resourceVersion"])

    def _line(self, line: bytes, version: str) -> str:
        """One watch event; returns the version to go on from ("" to list again)."""
        event = json.loads(line)
        obj = event.get("object") or {}
        if event.get("type") == "ERROR":
            return ""  # too old (410 Gone): list again
        version = obj.get("metadata", {}).get("resourceVersion", version)
        if event.get("type") != "BOOKMARK":
            self._deliver(str(event.get("type")), obj)
        return str(version)

    def _watch(self, version: str) -> str:
        """One watch request, to its end; returns the version to go on from."""
        resp = self._call(label_selector=self.selector, watch=True,
                          resource_version=version, allow_watch_bookmarks=True,
                          timeout_seconds=240, _preload_content=False,
                          _request_timeout=WATCH_TIMEOUT)  # fmt: skip
        buf, ended = b"", False
        try:
            for chunk in resp.stream(65536):
                buf += chunk
                while b"\n" in buf and version:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        version = self._line(line, version)
                if self.stop.is_set() or not version:
                    break
            else:
                ended = True
        finally:
            # A watch left mid-stream still has data on its connection: close it rather than
            # hand it back to the pool the workers' requests share.
            if not ended:
                resp.close()
            resp.release_conn()
        return version

    def run(self) -> None:
        version = ""
        while not self.stop.is_set():
            try:
                version = version or self._list()
                version = self._watch(version)
            except (ApiException, OSError, ValueError) as exc:
                log.warning("%s watch broke (%s); listing again", self.kind, exc)
                version = ""
                time.sleep(1)
            except Exception:  # keep watching whatever happens
                log.exception("%s watch failed; listing again", self.kind)
                version = ""
                time.sleep(1)
