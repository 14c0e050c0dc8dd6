"""kopf handlers: thin. Every trigger (the object, its Jobs, their pods, a timer) leads to the
same idempotent reconcile round, so that a missed or repeated event changes nothing."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, cast

import kopf

from medforge_operator import COMPOSITES, CONTRIBUTIONS, GROUP, VERSION, jobs
from medforge_operator import reconcile_composite as rcomp
from medforge_operator import reconcile_contribution as rcon
from medforge_operator.kube import Kube
from medforge_operator.metrics import RECONCILE_SECONDS, RECONCILES
from medforge_operator.settings import Settings
from medforge_operator.store import ForgeStore

JSON = dict[str, Any]
log = logging.getLogger("medforge.operator")


@dataclass
class Runtime:
    settings: Settings
    kube: Kube
    store: ForgeStore


RUNTIME: Runtime | None = None


def rt() -> Runtime:
    if RUNTIME is None:
        raise RuntimeError("the operator runtime is not initialised")
    return RUNTIME


def plain(body: Any) -> JSON:
    out: JSON = json.loads(json.dumps(dict(body)))
    return out


def event(obj: JSON, etype: str, reason: str, message: str) -> None:
    kopf.event(cast(Any, obj), type=etype, reason=reason, message=message[:1024])


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Progress and diff-base live in status, never in annotations on the user's object.
    settings.persistence.progress_storage = kopf.StatusProgressStorage(field="status.kopf.progress")
    settings.persistence.diffbase_storage = kopf.StatusDiffBaseStorage(field="status.kopf.diffbase")
    settings.posting.level = logging.WARNING  # our own Events say what happened
    settings.execution.max_workers = rt().settings.concurrency
    settings.batching.worker_limit = None
    settings.batching.idle_timeout = 30.0
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    settings.networking.request_timeout = 60


def _run(kind: str, fn: Any, obj: JSON) -> Any:
    r = rt()
    t0 = time.monotonic()
    try:
        out = fn(obj, r.kube, r.store, r.settings, event)
        RECONCILES.labels(kind, "ok").inc()
        return out
    except Exception:
        RECONCILES.labels(kind, "error").inc()
        raise
    finally:
        RECONCILE_SECONDS.labels(kind).observe(time.monotonic() - t0)


def _composites_for(namespace: str) -> None:
    """A contribution changed: let every composite that may select it look again."""
    r = rt()
    spaces = r.settings.namespaces or (None,)
    for ns in spaces:
        for c in r.kube.list_objects(COMPOSITES, ns):
            _run("composite", rcomp.reconcile, c)


def _contribution(obj: JSON) -> None:
    before = (obj.get("status") or {}).get("phase")
    new = _run("contribution", rcon.reconcile, obj)
    if new.get("phase") != before and new.get("phase") in ("Succeeded", "Failed"):
        _composites_for(obj["metadata"]["namespace"])


# ----- LoRAContribution -----


@kopf.on.event(GROUP, VERSION, CONTRIBUTIONS)
def contribution_event(type: str, body: kopf.Body, **_: Any) -> None:
    if type == "DELETED":
        _composites_for(body["metadata"]["namespace"])
        return
    obj = plain(body)
    if rcon.settled(obj):
        return
    _contribution(obj)


def _unsettled(body: kopf.Body, **_: Any) -> bool:
    return not rcon.settled(plain(body))


@kopf.timer(GROUP, VERSION, CONTRIBUTIONS, interval=20, initial_delay=20, when=_unsettled)
def contribution_timer(body: kopf.Body, **_: Any) -> None:
    _contribution(plain(body))


@kopf.on.event("batch", "v1", "jobs", labels={jobs.LABEL_COMPONENT: "train"})
@kopf.on.event("", "v1", "pods", labels={jobs.LABEL_COMPONENT: "train"})
def training_child_event(type: str, body: kopf.Body, **_: Any) -> None:
    labels = body["metadata"].get("labels") or {}
    owner = labels.get(jobs.LABEL_OWNER)
    if not owner:
        return
    obj = rt().kube.get_object(CONTRIBUTIONS, body["metadata"]["namespace"], owner)
    if obj is not None and not rcon.settled(obj):
        _contribution(obj)


# ----- CompositeModel -----


@kopf.on.event(GROUP, VERSION, COMPOSITES)
def composite_event(type: str, body: kopf.Body, **_: Any) -> None:
    if type != "DELETED":
        _run("composite", rcomp.reconcile, plain(body))


@kopf.timer(GROUP, VERSION, COMPOSITES, interval=30, initial_delay=30)
def composite_timer(body: kopf.Body, **_: Any) -> None:
    _run("composite", rcomp.reconcile, plain(body))


@kopf.on.event("batch", "v1", "jobs", labels={jobs.LABEL_COMPONENT: "merge"})
@kopf.on.event("", "v1", "pods", labels={jobs.LABEL_COMPONENT: "merge"})
def merge_child_event(type: str, body: kopf.Body, **_: Any) -> None:
    owner = (body["metadata"].get("labels") or {}).get(jobs.LABEL_OWNER)
    if owner:
        obj = rt().kube.get_object(COMPOSITES, body["metadata"]["namespace"], owner)
        if obj is not None:
            _run("composite", rcomp.reconcile, obj)
