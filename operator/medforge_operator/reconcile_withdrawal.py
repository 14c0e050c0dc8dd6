"""The withdrawal side of a composite's round (composite/withdrawal.py holds the rules): the
inputs that left, with their reasons read from the contributions; the pending merge stopped;
the erasures that are due; and the Events on both sides."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from medforge_common.api import EventReason
from medforge_operator import CONTRIBUTIONS, composite, erasure, names
from medforge_operator.bodies import Obj
from medforge_operator.catalog import Catalog
from medforge_operator.conditions import parse_now
from medforge_operator.kubeapi import KubeApi
from medforge_operator.metrics import WITHDRAWALS, WITHDRAWALS_ERASED
from medforge_operator.statuswrite import apply_changes
from medforge_operator.store import ForgeStore, StoreUnreachable

JSON = dict[str, Any]
EventFn = Callable[[Obj, str, str, str], None]
log = logging.getLogger("medforge.composite")


def departures(obj: Obj, o: composite.Observation, kube: KubeApi, at: str) -> None:
    """The merged inputs whose contributions no longer consent or exist, each with its reason
    (read from the contribution itself: the forge never has to act)."""
    status = obj.get("status") or {}
    present = {(c["metadata"]["namespace"], c["metadata"]["name"]) for c in o.contribs}
    gone = composite.departed(status, present)
    if not gone:
        return
    me = f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"
    o.departures = [
        replace(
            d,
            reason=erasure.departure_reason(
                kube.get_object(CONTRIBUTIONS, d.namespace, d.name), me
            ),
        )
        for d in gone
    ]
    cascade = composite.cascades(obj.get("spec") or {})
    o.withdrawal = composite.withdraw(status, o.departures, at, cascade)


def cancel(obj: Obj, pending: JSON, kube: KubeApi, cat: Catalog) -> None:
    """Stop the pending merge: its Job (the one this revision recorded, by uid) goes with its
    pods, and its URLs are forgotten."""
    ns = obj["metadata"]["namespace"]
    job = kube.get_job(ns, names.merge_job_name(obj["metadata"]["name"], pending["revision"]))
    if job is not None and job["metadata"].get("uid") == pending.get("jobUid"):
        cat.configs.forget(job)
        kube.delete_job(ns, job["metadata"]["name"])


def erase_due(obj: Obj, kube: KubeApi, store: ForgeStore, event: EventFn, at: str) -> JSON:
    """Erase the withdrawals whose retention is over (spec.withdrawal.retention after the
    replacement was accepted); a store that does not answer is tried again next round."""
    try:
        retention, _ = composite.withdrawal_settings(obj["spec"])
    except ValueError:
        return {}  # the CRD's pattern keeps this out; nothing is erased early on a bad value
    changes: JSON = {}
    for record in composite.erasure_due(obj.get("status") or {}, retention, parse_now(at)):
        try:
            changes = erasure.erase(obj, record, kube, store, event, at)
        except StoreUnreachable as exc:
            log.warning("erasure of %s/%s waits: %s", record["namespace"], record["name"], exc)
            break
        obj = {**obj, "status": apply_changes(obj.get("status") or {}, changes)}
        WITHDRAWALS_ERASED.inc()
    return changes


def tell(obj: Obj, o: composite.Observation, event: EventFn) -> None:
    """A withdrawal seen: the forge hears which revisions no longer serve, the hospital (in its
    namespace) that its input left."""
    me = f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"
    records = {
        (w["namespace"], w["name"], w["digest"]): w
        for w in ((o.withdrawal.changes if o.withdrawal else {}).get("withdrawals") or [])
    }
    for d in o.departures:
        WITHDRAWALS.labels(d.reason).inc()
        w = records.get((d.namespace, d.name, d.digest)) or {}
        revisions = w.get("revisions") or []
        event(
            obj,
            "Warning",
            EventReason.WITHDRAWN,
            f"{d.ident} left ({d.reason}): revision(s) {revisions or 'none'} withdrawn; "
            + (
                "a replacement without it merges next"
                if w.get("state") == "Replacing"
                else "no replacement is needed"
            ),
        )
        target = {
            "apiVersion": "medforge.io/v1alpha1",
            "kind": "LoRAContribution",
            "metadata": {"namespace": d.namespace, "name": d.name},
        }
        event(
            target,
            "Normal",
            EventReason.WITHDRAWN,
            f"{me}: this contribution left ({d.reason}); no new revision will hold it, and its "
            "files are erased once a replacement is accepted",
        )
    for i in o.withdrawal.cascaded if o.withdrawal is not None else []:
        parent = (i.get("parent") or {}).get("revision")
        target = {
            "apiVersion": "medforge.io/v1alpha1",
            "kind": "LoRAContribution",
            "metadata": {"namespace": i["namespace"], "name": i["name"]},
        }
        event(
            target,
            "Warning",
            EventReason.PARENT_WITHDRAWN,
            f"{me}: revision {parent}, which this contribution trained from, held an input that "
            "left; the replacement merges without this update: train again from the "
            "replacement (spec.startFrom revision latest, once it is served)",
        )
    if o.withdrawal is not None and o.withdrawal.cancel:
        event(
            obj,
            "Normal",
            EventReason.REVISION_CANCELLED,
            "the pending merge read an input that was withdrawn: stopped before it could finish",
        )
