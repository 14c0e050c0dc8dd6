"""kopf handlers: thin. Every trigger (an object's events; its Jobs' and pods' events, from
label-selected watches in childwatch.py; a periodic resync) only queues the object; a pool of
workers runs one idempotent reconcile round per queued object, so a burst of events costs one
round and a missed event changes nothing.

The operator's state lives in one Runtime, built in main and handed to kopf as its memo: no
module-level mutable state."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType
from typing import Any, cast

import kopf

from medforge_common.api import BaseModelPhase, ContributionPhase
from medforge_operator import (
    BASEMODELS,
    COMPOSITES,
    CONTRIBUTIONS,
    EVALUATIONSETS,
    GROUP,
    INSTITUTIONS,
    PRIVACYBUDGETS,
    VERSION,
    basemodel,
    jobs,
    jobstatus,
)
from medforge_operator import reconcile_basemodel as rbase
from medforge_operator import reconcile_composite as rcomp
from medforge_operator import reconcile_contribution as rcon
from medforge_operator import reconcile_institution as rinst
from medforge_operator.bodies import BaseModelBody, CompositeBody, ContributionBody, Obj, plain
from medforge_operator.catalog import Catalog
from medforge_operator.childwatch import ChildWatch
from medforge_operator.evaluation import ANNOTATION_COMPOSITE
from medforge_operator.kube import Kube
from medforge_operator.leader import LeaderElection, own_namespace
from medforge_operator.metrics import (
    ACTIVE_WORKERS,
    RECONCILE_ERRORS,
    RECONCILE_SECONDS,
    RECONCILE_TIME,
    RECONCILE_TOTAL,
    RECONCILES,
)
from medforge_operator.observed import ObservedObjects
from medforge_operator.settings import Settings
from medforge_operator.store import ForgeStore
from medforge_operator.workqueue import FailedKeys, Key, WorkQueue

JSON = dict[str, Any]
log = logging.getLogger("medforge.operator")
# Every FULL_RESYNC_EVERY-th resync queues every contribution in flight, not only those that
# need polling: the safety net in case a watch event was lost.
FULL_RESYNC_EVERY = 15


@dataclass
class Runtime:
    """Everything the operator holds while it runs."""

    settings: Settings
    kube: Kube
    store: ForgeStore
    catalog: Catalog
    queue: WorkQueue | None = None
    stopping: threading.Event = field(default_factory=threading.Event)
    failed: FailedKeys = field(default_factory=FailedKeys)
    leader: LeaderElection | None = None
    observed: ObservedObjects = field(default_factory=ObservedObjects)

    def leading(self) -> bool:
        return self.queue is not None and not self.stopping.is_set()

    def enqueue(self, plural: str, namespace: str, name: str, body: JSON | None = None) -> None:
        if self.queue is not None:
            self.queue.add((plural, namespace, name), body)

    def event(self, obj: Obj, etype: str, reason: str, message: str) -> None:
        try:
            self.kube.post_event(obj, etype, reason, message)
        except Exception:  # an Event is best effort; the status carries the same facts
            log.warning("could not post event %s for %s", reason, obj["metadata"].get("name"))

    def composites(self) -> None:
        """A contribution changed: let every composite that may select it look again."""
        for ns in self.settings.namespaces or (None,):
            for c in self.kube.list_objects(COMPOSITES, ns):
                self.enqueue(COMPOSITES, c["metadata"]["namespace"], c["metadata"]["name"])


def rt(memo: Any) -> Runtime:
    runtime = getattr(memo, "runtime", None)
    if not isinstance(runtime, Runtime):
        raise RuntimeError("the operator runtime is not initialised (kopf.run(memo=...))")
    return runtime


def work(r: Runtime, key: Hashable, body: JSON | None) -> None:
    """One reconcile round for a queued (plural, namespace, name); `body` is the object as its
    own watch event delivered it, when that event queued it. A round that raises is noted, so
    that the resync retries it."""
    plural, ns, name = cast(Key, key)
    kind = KINDS[plural].label
    t0 = time.monotonic()
    ACTIVE_WORKERS.labels(kind).inc()
    try:
        _round(r, plural, ns, name, body)
    except Exception:
        RECONCILES.labels(kind, "error").inc()
        RECONCILE_TOTAL.labels(kind, "error").inc()
        RECONCILE_ERRORS.labels(kind).inc()
        r.failed.add((plural, ns, name))
        raise  # the work queue retries it with backoff
    else:
        RECONCILES.labels(kind, "ok").inc()
        RECONCILE_TOTAL.labels(kind, "success").inc()
        r.failed.discard((plural, ns, name))
    finally:
        ACTIVE_WORKERS.labels(kind).dec()
        RECONCILE_SECONDS.labels(kind).observe(time.monotonic() - t0)
        RECONCILE_TIME.labels(kind).observe(time.monotonic() - t0)


def _contribution_round(r: Runtime, obj: JSON) -> None:
    if rcon.settled(obj):
        return
    before = (obj.get("status") or {}).get("phase")
    new = rcon.reconcile(
        cast(ContributionBody, obj), r.kube, r.store, r.settings, r.event, r.catalog
    )
    finished = (ContributionPhase.SUCCEEDED, ContributionPhase.FAILED)
    if new.get("phase") != before and new.get("phase") in finished:
        r.composites()


def _basemodel_round(r: Runtime, obj: JSON) -> None:
    before = (obj.get("status") or {}).get("phase")
    new = rbase.reconcile(cast(BaseModelBody, obj), r.kube, r.store, r.event)
    r.catalog.base_models.forget(obj["metadata"]["name"])
    if new.get("phase") == BaseModelPhase.READY and before != BaseModelPhase.READY:
        _waiting_on_base_models(r)


def _composite_round(r: Runtime, obj: JSON) -> None:
    rcomp.reconcile(cast(CompositeBody, obj), r.kube, r.store, r.settings, r.event, r.catalog)


def _institution_round(r: Runtime, obj: JSON) -> None:
    """Any key change may change which inputs a composite accepts: they all look again."""
    rinst.reconcile(obj, r.kube, r.store, r.catalog, r.settings.namespaces)
    r.composites()


@dataclass(frozen=True)
class Kind:
    """How the work queue serves one kind: its label in metrics and its round (a new kind adds
    a row here, its reconcile module and its watch handler; docs/architecture.md)."""

    label: str
    round: Callable[[Runtime, JSON], None]


KINDS: Mapping[str, Kind] = MappingProxyType(
    {
        CONTRIBUTIONS: Kind("contribution", _contribution_round),
        BASEMODELS: Kind("basemodel", _basemodel_round),
        COMPOSITES: Kind("composite", _composite_round),
        INSTITUTIONS: Kind("institution", _institution_round),
    }
)


def _round(r: Runtime, plural: str, ns: str, name: str, body: JSON | None) -> None:
    obj = body if body is not None else r.kube.get_object(plural, ns, name)
    if obj is not None:
        KINDS[plural].round(r, obj)


def _waiting_on_base_models(r: Runtime) -> None:
    """A base model became usable: queue what may have waited for it."""
    for ns in r.settings.namespaces or (None,):
        for c in r.kube.iter_objects(CONTRIBUTIONS, ns):
            if rcon.needs_polling(c):
                r.enqueue(CONTRIBUTIONS, c["metadata"]["namespace"], c["metadata"]["name"])
    r.composites()


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Progress and diff-base live in status, never in annotations on the user's object.
    settings.persistence.progress_storage = kopf.StatusProgressStorage(field="status.kopf.progress")
    settings.persistence.diffbase_storage = kopf.StatusDiffBaseStorage(field="status.kopf.diffbase")
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    settings.networking.request_timeout = 60
    # Member namespaces are the tenants' to fill: the initial listing is read a chunk at a time,
    # and an object's worker (holding its newest body) goes soon after its events stop.
    settings.watching.chunk_size = 500
    settings.queueing.idle_timeout = 1.0
    r = rt(memo)
    if not r.settings.leader_election:
        lead(r)
    elif r.leader is None:
        r.leader = LeaderElection(
            r.kube,
            r.settings.lease_namespace or own_namespace(),
            r.settings.lease_name,
            partial(lead, r),
            partial(step_down, r),
            r.stopping,
        )
        r.leader.start()


def lead(r: Runtime) -> None:
    """Start reconciling: the work queue, the resync (its first pass is full: whatever changed
    while another replica led, or none did) and the child watches (they list first)."""
    if r.queue is not None:
        return
    r.queue = WorkQueue(partial(work, r), r.settings.concurrency)
    threading.Thread(target=resync, args=(r,), name="resync", daemon=True).start()
    selector = f"app.kubernetes.io/managed-by={jobs.MANAGED_BY}"
    for ns in r.settings.namespaces or (None,):
        for kind in ("Job", "Pod"):
            ChildWatch(r.kube, kind, ns, selector, partial(child_event, r), r.stopping).start()


def step_down(r: Runtime) -> None:
    """The Lease went to another replica: stop at once (the pod restarts as a standby) rather
    than reconcile beside the new leader."""
    r.stopping.set()
    if r.queue is not None:
        r.queue.stop()
    os.kill(os.getpid(), signal.SIGTERM)


def _resync_pass(r: Runtime, full: bool) -> None:
    failed = r.failed.snapshot()
    seen: set[Key] = set()
    for ns in r.settings.namespaces or (None,):
        for c in r.kube.iter_objects(CONTRIBUTIONS, ns):
            key = (CONTRIBUTIONS, c["metadata"]["namespace"], c["metadata"]["name"])
            seen.add(key)
            if rcon.needs_polling(c) or ((full or key in failed) and not rcon.settled(c)):
                r.enqueue(*key)  # no body: a listed copy may be older than a round in progress
        for c in r.kube.list_objects(COMPOSITES, ns):
            key = (COMPOSITES, c["metadata"]["namespace"], c["metadata"]["name"])
            seen.add(key)
            r.enqueue(*key)
    for b in r.kube.list_objects(BASEMODELS):
        key = (BASEMODELS, "", b["metadata"]["name"])
        seen.add(key)
        if not basemodel.settled(b) or key in failed:
            r.enqueue(*key)
    for i in r.kube.list_objects(INSTITUTIONS):
        key = (INSTITUTIONS, "", i["metadata"]["name"])
        seen.add(key)
        if key in failed or not rinst.settled(i):
            r.enqueue(*key)
    r.failed.forget_all_but(failed, seen)  # objects deleted since their failure


def resync(r: Runtime) -> None:
    """The safety net behind the events: every interval, one list per kind queues every
    composite, every contribution that waits on something no watch reports (a store to come
    back, a base model to be verified, digests to verify), every BaseModel not verified yet and
    every object whose last round failed; every FULL_RESYNC_EVERY-th time, every contribution
    in flight. One list each is far cheaper than a timer per object, and a Job that is simply
    queued or training costs nothing between its own events."""
    passes = FULL_RESYNC_EVERY - 1  # the first pass is full: whatever changed while we were down
    while not r.stopping.wait(r.settings.requeue_seconds):
        passes += 1
        try:
            _resync_pass(r, full=passes % FULL_RESYNC_EVERY == 0)
        except Exception:
            log.exception("resync failed; trying again in %s s", r.settings.requeue_seconds)


@kopf.on.cleanup()
def stop(memo: kopf.Memo, **_: Any) -> None:
    r = rt(memo)
    r.stopping.set()
    if r.queue is not None:
        r.queue.stop()
    if r.leader is not None:
        r.leader.release()  # the standby takes over now, not after the Lease expires


# ----- LoRAContribution and its Jobs and pods -----


@kopf.on.event(GROUP, VERSION, CONTRIBUTIONS)
def contribution_event(type: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    r, obj = rt(memo), plain(body)
    r.observed.observe(CONTRIBUTIONS, type, obj)
    if type == "DELETED":
        r.composites()
        return
    status = obj.get("status") or {}
    # A status that already describes this generation was written by us: its Job's and pods'
    # events (and the resync) drive what happens next, so our own write does not re-trigger.
    if status.get("observedGeneration") != obj["metadata"].get("generation"):
        meta = obj["metadata"]
        r.enqueue(CONTRIBUTIONS, meta["namespace"], meta["name"], obj)
        # A spec change may withdraw consent (spec.sharing): the composites look at once.
        r.composites()


# ----- BaseModel (cluster-scoped) -----


@kopf.on.event(GROUP, VERSION, BASEMODELS)
def basemodel_event(type: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    r, obj = rt(memo), plain(body)
    r.observed.observe(BASEMODELS, type, obj)
    if type != "DELETED" and not basemodel.settled(obj):
        r.enqueue(BASEMODELS, "", body["metadata"]["name"])


@kopf.on.event(GROUP, VERSION, INSTITUTIONS)
def institution_event(type: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Keys registered, rotated or revoked (a deleted Institution: its keys are gone)."""
    r, obj = rt(memo), plain(body)
    r.observed.observe(INSTITUTIONS, type, obj)
    r.catalog.institutions.forget()
    if type == "DELETED":
        r.composites()
    elif not rinst.settled(obj):
        r.enqueue(INSTITUTIONS, "", obj["metadata"]["name"], obj)


@kopf.on.event(GROUP, VERSION, PRIVACYBUDGETS)
def budget_event(type: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """The privacy ledger's budgets; one the officer changed lets refused contributions retry."""
    r, obj = rt(memo), plain(body)
    r.observed.observe(PRIVACYBUDGETS, type, obj)
    seen = (obj.get("status") or {}).get("observedGeneration") == obj["metadata"].get("generation")
    if type != "DELETED" and not seen:
        ns = obj["metadata"]["namespace"]
        for c in r.kube.iter_objects(CONTRIBUTIONS, ns):
            if rcon.needs_polling(c):
                r.enqueue(CONTRIBUTIONS, ns, c["metadata"]["name"])


# ----- CompositeModel and its Jobs and pods -----


@kopf.on.event(GROUP, VERSION, COMPOSITES)
def composite_event(type: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    r = rt(memo)
    r.observed.observe(COMPOSITES, type, plain(body))
    if type != "DELETED":
        meta = body["metadata"]
        r.enqueue(COMPOSITES, meta["namespace"], meta["name"])


@kopf.on.event(GROUP, VERSION, EVALUATIONSETS)
def evaluation_set_event(type: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A hospital's set came, went or changed: the composites it names look at their sites
    (only a candidate being scored reads them)."""
    meta, r = body["metadata"], rt(memo)
    if type == "DELETED" or (body.get("status") or {}).get("observedGeneration") != meta.get(
        "generation"
    ):
        for forge in ((body.get("spec") or {}).get("forges") or [])[:64]:
            if isinstance(forge, str) and forge.count("/") == 1:
                forge_ns, forge_name = forge.split("/")
                r.enqueue(COMPOSITES, forge_ns, forge_name)


def child_event(
    r: Runtime, kind: str, etype: str, namespace: str, labels: dict[str, str], obj: JSON
) -> None:
    """A Job or pod of ours changed: queue its owner."""
    if kind == "Job" and not jobstatus.worth_a_round(etype, obj):
        return
    owner = jobs.owner_of(obj)
    component = labels.get(jobs.LABEL_COMPONENT)
    if owner and component == "train":
        r.enqueue(CONTRIBUTIONS, namespace, owner)
    elif owner and component == "merge":
        r.enqueue(COMPOSITES, namespace, owner)
    elif component == "evaluate":
        # The annotation only says which composite to look at; the round derives the rest.
        forge = ((obj.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_COMPOSITE)
        if isinstance(forge, str) and forge.count("/") == 1:
            forge_ns, forge_name = forge.split("/")
            r.enqueue(COMPOSITES, forge_ns, forge_name)
