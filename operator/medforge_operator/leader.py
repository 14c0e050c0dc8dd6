"""Leader election on a coordination.k8s.io Lease, as client-go's leaderelection does it: the
leader renews the Lease every few seconds; a standby takes it over once it has gone unrenewed
for its duration. Only the leader runs reconcile rounds (the work queue, the resync, the child
watches); a standby only keeps its watches warm. Writes carry the Lease's resourceVersion, so
two replicas can never both believe they hold it."""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import uuid
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any

from kubernetes.client.exceptions import ApiException

from medforge_operator.kube import Kube

JSON = dict[str, Any]
log = logging.getLogger("medforge.leader")
STAMP = "%Y-%m-%dT%H:%M:%S.%fZ"  # metav1.MicroTime


class Step(StrEnum):
    CREATE = "create"  # no Lease yet
    RENEW = "renew"  # ours
    TAKE = "take"  # another holder's, expired (or released)
    WAIT = "wait"  # another holder's, live


def identity() -> str:
    """This replica's name in the Lease: the pod's name (HOSTNAME in a pod) and a random tail,
    so that a restarted pod never mistakes its predecessor's Lease for its own."""
    return f"{os.environ.get('HOSTNAME', 'medforge-operator')}_{uuid.uuid4().hex[:8]}"


def parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    for fmt in (STAMP, "%Y-%m-%dT%H:%M:%SZ"):
        try:
            return dt.datetime.strptime(value, fmt).replace(tzinfo=dt.UTC)
        except ValueError:
            continue
    return None


def decide(lease: JSON | None, me: str, now: dt.datetime) -> Step:
    """What to do with the Lease as it is now."""
    if lease is None:
        return Step.CREATE
    spec = lease.get("spec") or {}
    holder = spec.get("holderIdentity") or ""
    if holder == me:
        return Step.RENEW
    renewed = parse_time(spec.get("renewTime"))
    duration = dt.timedelta(seconds=int(spec.get("leaseDurationSeconds") or 15))
    if not holder or renewed is None or now > renewed + duration:
        return Step.TAKE
    return Step.WAIT


def held_lease(lease: JSON | None, name: str, me: str, now: dt.datetime, duration: int) -> JSON:
    """The Lease as this replica writes it (keeping the resourceVersion it read)."""
    old = lease or {}
    spec = old.get("spec") or {}
    ours = spec.get("holderIdentity") == me
    stamp = now.strftime(STAMP)
    meta: JSON = {"name": name}
    if old.get("metadata", {}).get("resourceVersion"):
        meta["resourceVersion"] = old["metadata"]["resourceVersion"]
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": meta,
        "spec": {
            "holderIdentity": me,
            "leaseDurationSeconds": duration,
            "acquireTime": spec.get("acquireTime") if ours else stamp,
            "renewTime": stamp,
            "leaseTransitions": int(spec.get("leaseTransitions") or 0) + (0 if ours else 1),
        },
    }


class LeaderElection(threading.Thread):
    def __init__(
        self,
        kube: Kube,
        namespace: str,
        name: str,
        on_started: Callable[[], None],
        on_lost: Callable[[], None],
        stop: threading.Event,
        duration: int = 15,
        retry: float = 2.0,
    ) -> None:
        super().__init__(name="leader-election", daemon=True)
        self.kube, self.namespace, self.lease_name = kube, namespace, name
        self.on_started, self.on_lost, self.stop_event = on_started, on_lost, stop
        self.duration, self.retry = duration, retry
        self.me = identity()
        self.leading = False
        self._last_renew: dt.datetime | None = None

    def _attempt(self) -> bool:
        """One round of the protocol; whether this replica holds the Lease afterwards."""
        now = dt.datetime.now(dt.UTC)
        lease = self.kube.get_lease(self.namespace, self.lease_name)
        step = decide(lease, self.me, now)
        if step == Step.WAIT:
            return False
        body = held_lease(lease, self.lease_name, self.me, now, self.duration)
        try:
            if step == Step.CREATE:
                self.kube.create_lease(self.namespace, body)
            else:
                self.kube.replace_lease(self.namespace, self.lease_name, body)
        except ApiException as exc:
            if exc.status in (404, 409):  # someone else wrote first: read again next round
                return False
            raise
        self._last_renew = now
        return True

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                held = self._attempt()
            except Exception as exc:  # the API server is away: keep what we have, for now
                log.warning("leader election: %s", exc)
                held = self.leading and self._fresh()
            if held and not self.leading:
                self.leading = True
                log.info("became the leader (%s)", self.me)
                self.on_started()
            elif not held and self.leading and not self._fresh():
                self.leading = False
                log.error("lost the lease %s/%s; stopping", self.namespace, self.lease_name)
                self.on_lost()
                return
            self.stop_event.wait(self.retry)
        self.release()

    def _fresh(self) -> bool:
        """Whether our last renewal is still within the Lease's duration."""
        if self._last_renew is None:
            return False
        return dt.datetime.now(dt.UTC) < self._last_renew + dt.timedelta(seconds=self.duration)

    def release(self) -> None:
        """On a clean stop, hand the Lease on at once instead of letting it expire."""
        if not self.leading:
            return
        try:
            lease = self.kube.get_lease(self.namespace, self.lease_name)
            if lease and (lease.get("spec") or {}).get("holderIdentity") == self.me:
                lease["spec"]["holderIdentity"] = ""
                self.kube.replace_lease(self.namespace, self.lease_name, lease)
        except Exception as exc:  # it expires by itself anyway
            log.warning("could not release the lease: %s", exc)
        self.leading = False


def own_namespace() -> str:
    """The pod's namespace (its ServiceAccount's), or "default" outside a cluster."""
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    try:
        return path.read_text().strip() or "default"
    except OSError:
        return "default"
