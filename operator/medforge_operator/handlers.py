"""kopf handlers: thin. Every trigger (an object's events; its Jobs' and pods' events, from
label-selected watches in childwatch.py; a periodic resync) only queues the object; a pool of workers runs one idempotent reconcile round per queued object,
so a burst of events costs one round and a missed event changes nothing."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, cast

import kopf

from medforge_operator import BASEMODELS, COMPOSITES, CONTRIBUTIONS, GROUP, VERSION, basemodel, jobs
from medforge_operator import reconcile_basemodel as rbase
from medforge_operator import reconcile_composite as rcomp
from medforge_operator import reconcile_contribution as rcon
from medforge_operator.catalog import Catalog
from medforge_operator.childwatch import ChildWatch
from medforge_operator.kube import Kube
from medforge_operator.metrics import RECONCILE_SECONDS, RECONCILES
from medforge_operator.settings import Settings
from medforge_operator.store import ForgeStore
from medforge_operator.workqueue import WorkQueue

JSON = dict[str, Any]
log = logging.getLogger("medforge.operator")


@dataclass
class Runtime:
    settings: Settings
    kube: Kube
    store: ForgeStore
    catalog: Catalog
    queue: WorkQueue | None = None


RUNTIME: Runtime | None = None
STOPPING = threading.Event()
# Keys whose last round raised: the resync queues them again, whatever their status says.
FAILED: set[tuple[str, str, str]] = set()
FAILED_LOCK = threading.Lock()
# Every FULL_RESYNC_EVERY-th resync queues every contribution in flight, not only those that
# need polling: the safety net in case a watch event was lost.
FULL_RESYNC_EVERY = 15


def rt() -> Runtime:
    if RUNTIME is None:
        raise RuntimeError("the operator runtime is not initialised")
    return RUNTIME


def enqueue(plural: str, namespace: str, name: str, body: JSON | None = None) -> None:
    queue = rt().queue
    if queue is not None:
        queue.add((plural, namespace, name), body)


def _event(obj: JSON, etype: str, reason: str, message: str) -> None:
    try:
        rt().kube.post_event(obj, etype, reason, message)
    except Exception:  # an Event is best effort; the status carries the same facts
        log.warning("could not post event %s for %s", reason, obj["metadata"].get("name"))


def _composites() -> None:
    """A contribution changed: let every composite that may select it look again."""
    r = rt()
    for ns in r.settings.namespaces or (None,):
        for c in r.kube.list_objects(COMPOSITES, ns):
            enqueue(COMPOSITES, c["metadata"]["namespace"], c["metadata"]["name"])


def work(key: Hashable, body: JSON | None) -> None:
    """One reconcile round for a queued (plural, namespace, name); `body` is the object as its
    own watch event delivered it, when that event queued it. A round that raises is noted in
    FAILED, so that the resync retries it."""
    plural, ns, name = cast(tuple[str, str, str], key)
    kind = {CONTRIBUTIONS: "contribution", COMPOSITES: "composite"}.get(plural, "basemodel")
    t0 = time.monotonic()
    try:
        _round(plural, ns, name, body)
    except Exception:
        RECONCILES.labels(kind, "error").inc()
        with FAILED_LOCK:
            FAILED.add((plural, ns, name))
        raise
    else:
        RECONCILES.labels(kind, "ok").inc()
        with FAILED_LOCK:
            FAILED.discard((plural, ns, name))
    finally:
        RECONCILE_SECONDS.labels(kind).observe(time.monotonic() - t0)


def _round(plural: str, ns: str, name: str, body: JSON | None) -> None:
    r = rt()
    obj = body if body is not None else r.kube.get_object(plural, ns, name)
    if obj is None:
        return
    if plural == CONTRIBUTIONS:
        if rcon.settled(obj):
            return
        before = (obj.get("status") or {}).get("phase")
        new = rcon.reconcile(obj, r.kube, r.store, r.settings, _event, r.catalog)
        if new.get("phase") != before and new.get("phase") in ("Succeeded", "Failed"):
            _composites()
    elif plural == BASEMODELS:
        before = (obj.get("status") or {}).get("phase")
        new = rbase.reconcile(obj, r.kube, r.store, _event)
        r.catalog.base_models.forget(name)
        if new.get("phase") == "Ready" and before != "Ready":
            _waiting_on_base_models()
    else:
        rcomp.reconcile(obj, r.kube, r.store, r.settings, _event, r.catalog)


def _waiting_on_base_models() -> None:
    """A base model became usable: queue what may have waited for it."""
    r = rt()
    for ns in r.settings.namespaces or (None,):
        for c in r.kube.list_objects(CONTRIBUTIONS, ns):
            if rcon.needs_polling(c):
                enqueue(CONTRIBUTIONS, c["metadata"]["namespace"], c["metadata"]["name"])
    _composites()


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Progress and diff-base live in status, never in annotations on the user's object.
    settings.persistence.progress_storage = kopf.StatusProgressStorage(field="status.kopf.progress")
    settings.persistence.diffbase_storage = kopf.StatusDiffBaseStorage(field="status.kopf.diffbase")
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    settings.networking.request_timeout = 60
    r = rt()
    if r.queue is None:
        r.queue = WorkQueue(work, r.settings.concurrency)
        threading.Thread(target=resync, name="resync", daemon=True).start()
        selector = f"app.kubernetes.io/managed-by={jobs.MANAGED_BY}"
        for ns in r.settings.namespaces or (None,):
            for kind in ("Job", "Pod"):
                ChildWatch(r.kube, kind, ns, selector, child_event, STOPPING).start()


def resync() -> None:
    """The safety net behind the events: every interval, one list per kind queues every
    composite, every contribution that waits on something no watch reports (a store to come
    back, a base model to be uploaded, digests to verify) and every object whose last round
    failed; every FULL_RESYNC_EVERY-th time, every contribution in flight. One list each is far
    cheaper than a timer per object, and a Job that is simply queued or training costs nothing
    between its own events."""
    r = rt()
    passes = FULL_RESYNC_EVERY - 1  # the first pass is full: whatever changed while we were down
    while True:
        time.sleep(r.settings.requeue_seconds)
        passes += 1
        full = passes % FULL_RESYNC_EVERY == 0
        with FAILED_LOCK:
            failed = set(FAILED)
        try:
            seen = set()
            for ns in r.settings.namespaces or (None,):
                for c in r.kube.list_objects(CONTRIBUTIONS, ns):
                    key = (CONTRIBUTIONS, c["metadata"]["namespace"], c["metadata"]["name"])
                    seen.add(key)
                    if rcon.needs_polling(c) or ((full or key in failed) and not rcon.settled(c)):
                        # No body: a listed copy may be older than a round in progress.
                        enqueue(*key)
                for c in r.kube.list_objects(COMPOSITES, ns):
                    key = (COMPOSITES, c["metadata"]["namespace"], c["metadata"]["name"])
                    seen.add(key)
                    enqueue(*key)
            for b in r.kube.list_objects(BASEMODELS):
                key = (BASEMODELS, "", b["metadata"]["name"])
                seen.add(key)
                if not basemodel.settled(b) or key in failed:
                    enqueue(*key)
            with FAILED_LOCK:
                FAILED.difference_update(failed - seen)  # objects deleted since their failure
        except Exception:
            log.exception("resync failed; trying again in %s s", r.settings.requeue_seconds)


@kopf.on.cleanup()
def stop(**_: Any) -> None:
    STOPPING.set()
    if RUNTIME is not None and RUNTIME.queue is not None:
        RUNTIME.queue.stop()


def plain(body: Any) -> JSON:
    out: JSON = json.loads(json.dumps(dict(body)))
    return out


def _meta(body: kopf.Body) -> tuple[str, str, JSON]:
    meta = body["metadata"]
    return meta["namespace"], meta["name"], dict(meta.get("labels") or {})


# ----- LoRAContribution and its Jobs and pods -----


@kopf.on.event(GROUP, VERSION, CONTRIBUTIONS)
def contribution_event(type: str, body: kopf.Body, **_: Any) -> None:
    ns, name, _labels = _meta(body)
    if type == "DELETED":
        _composites()
        return
    status = body.get("status") or {}
    # A status that already describes this generation was written by us: its Job's and pods'
    # events (and the timer) drive what happens next, so our own write does not re-trigger.
    if status.get("observedGeneration") != body["metadata"].get("generation"):
        enqueue(CONTRIBUTIONS, ns, name, plain(body))


# ----- BaseModel (cluster-scoped) -----


@kopf.on.event(GROUP, VERSION, BASEMODELS)
def basemodel_event(type: str, body: kopf.Body, **_: Any) -> None:
    if type != "DELETED" and not basemodel.settled(plain(body)):
        enqueue(BASEMODELS, "", body["metadata"]["name"])


# ----- CompositeModel and its Jobs and pods -----


@kopf.on.event(GROUP, VERSION, COMPOSITES)
def composite_event(type: str, body: kopf.Body, **_: Any) -> None:
    if type != "DELETED":
        ns, name, _labels = _meta(body)
        enqueue(COMPOSITES, ns, name)


def child_event(kind: str, etype: str, namespace: str, labels: dict[str, str], obj: JSON) -> None:
    """A Job or pod of ours changed: queue its owner."""
    if kind == "Job" and not jobs.worth_a_round(etype, obj):
        return
    owner = labels.get(jobs.LABEL_OWNER)
    component = labels.get(jobs.LABEL_COMPONENT)
    if owner and component == "train":
        enqueue(CONTRIBUTIONS, namespace, owner)
    elif owner and component == "merge":
        enqueue(COMPOSITES, namespace, owner)
