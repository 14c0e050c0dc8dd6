"""What reconcile rounds look up besides their own object, held by the operator's runtime:
namespace labels (membership and namespace selectors), BaseModels, and the config Secrets of
running Jobs. Short-lived caches keep a burst of rounds from repeating the same reads."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Mapping
from typing import Any

from kubernetes.client.exceptions import ApiException

from medforge_common.attestation import TrustedKey
from medforge_operator import BASEMODELS, INSTITUTIONS, basemodel, institution, jobs, signing
from medforge_operator.kubeapi import KubeApi
from medforge_operator.settings import Settings
from medforge_operator.store import ForgeStore

JSON = dict[str, Any]


class _TtlCache:
    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._items: dict[str, tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> tuple[bool, Any]:
        with self._lock:
            hit = self._items.get(key)
        if hit is None or time.monotonic() - hit[0] >= self.ttl:
            return False, None
        return True, hit[1]

    def drop(self, key: str) -> None:
        with self._lock:
            self._items.pop(key, None)

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            if len(self._items) > 10_000:  # bounded: stale entries go first
                cutoff = time.monotonic() - self.ttl
                self._items = {k: v for k, v in self._items.items() if v[0] >= cutoff}
            self._items[key] = (time.monotonic(), value)


class Namespaces:
    """Which namespaces are MedForge members (the only ones where the operator creates Jobs and
    Secrets), and their labels for CompositeModels' namespaceSelectors. Reads single namespaces
    only (get, never list), so a namespace-scoped install needs no cluster-wide right."""

    def __init__(self, kube: KubeApi, settings: Settings, ttl: float = 10.0) -> None:
        self.kube = kube
        self.s = settings
        self._cache = _TtlCache(ttl)

    def labels(self, name: str) -> dict[str, str] | None:
        hit, value = self._cache.get(name)
        if not hit:
            value = self.kube.namespace_labels(name)
            self._cache.put(name, value)
        return value  # type: ignore[no-any-return]

    def managed(self, name: str) -> bool:
        if self.s.namespaces:
            return name in self.s.namespaces
        key, value = self.s.member_selector
        return (self.labels(name) or {}).get(key) == value

    def not_managed_message(self, name: str) -> str:
        if self.s.namespaces:
            return f"namespace {name} is not among MEDFORGE_NAMESPACES"
        key, value = self.s.member_selector
        return (
            f"namespace {name} is not a MedForge member: the platform team labels member "
            f"namespaces {key}={value} (MEDFORGE_MEMBER_LABEL)"
        )


class BaseModels:
    """BaseModels by name, read through a short cache (a burst of contributions for one model
    reads it once)."""

    def __init__(self, kube: KubeApi, ttl: float = 3.0) -> None:
        self.kube = kube
        self._cache = _TtlCache(ttl)

    def resolve(self, name: str, pin: str | None, field_path: str) -> basemodel.Resolved:
        hit, obj = self._cache.get(name)
        if not hit:
            obj = self.kube.get_object(BASEMODELS, "", name)
            self._cache.put(name, obj)
        return basemodel.resolve(obj, name, pin, field_path)

    def forget(self, name: str) -> None:
        """The BaseModel changed (verified, say): the next round reads it afresh."""
        self._cache.drop(name)


class Institutions:
    """Every Institution (a handful), listed once per short while: the keys that sign for a
    namespace. Changed ones are forgotten at once (their round calls `forget`)."""

    def __init__(self, kube: KubeApi, ttl: float = 3.0) -> None:
        self.kube = kube
        self._cache = _TtlCache(ttl)

    def all(self) -> list[JSON]:
        hit, items = self._cache.get("")
        if not hit:
            items = self.kube.list_objects(INSTITUTIONS, None)
            self._cache.put("", items)
        return list(items)

    def trusted(self, namespace: str) -> list[TrustedKey]:
        return institution.trusted(self.all(), namespace)

    def active_ids(self) -> dict[str, frozenset[str]]:
        return institution.active_ids(self.all())

    def forget(self) -> None:
        self._cache.drop("")


class ConfigRefused(Exception):
    """The API server refused a Job's config Secret (400, 403 or 422: an admission policy, a
    quota): a status to report, not a round to retry forever."""


class JobConfigs:
    """Writes each running Job's config Secret with fresh presigned URLs: when the Job starts
    (a queued Job only once admitted, so its URLs never age in the queue) and again whenever a
    round finds them past half their lifetime (a retry after a long wait, a restarted
    operator). The caller derives the plan afresh from the custom resource and passes the
    grant it must stay inside (medforge_operator.signing); nothing is read back from the Job
    but its uid (checked by the caller against the one it recorded) and its deadline."""

    def __init__(self, kube: KubeApi, store: ForgeStore) -> None:
        self.kube = kube
        self.store = store
        self._expires: dict[str, float] = {}  # Job uid -> when its URLs expire (epoch s)
        self._lock = threading.Lock()

    def ensure(
        self, job: JSON, plan: Mapping[str, Any], grant: signing.Grant, lifetime: int
    ) -> None:
        """Called for a Job of ours that may start pods now: Active, not waiting in a queue.
        Raises signing.SigningRefused (nothing signed) or ConfigRefused."""
        uid = job["metadata"]["uid"]
        lifetime = jobs.capped_lifetime(job, lifetime, time.time())
        with self._lock:
            expires = self._expires.get(uid)
        now = time.time()
        if expires is not None and expires - now > lifetime / 2:
            return
        config = signing.sign(
            plan,
            grant,
            lambda u: self.store.presign_get(u, lifetime),
            lambda u: self.store.presign_put(u, lifetime),
        )
        until = now + lifetime
        stamp = dt.datetime.fromtimestamp(until, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        secret = jobs.config_secret(job, config, stamp)
        if jobs.secret_size(secret) > jobs.MAX_CONFIG_BYTES:
            raise ConfigRefused(
                f"the Job's config ({jobs.secret_size(secret)} bytes with its URLs) is larger "
                f"than a Secret may hold ({jobs.MAX_CONFIG_BYTES}); the base model has too many "
                "files: merge its shards into fewer files"
            )
        try:
            self.kube.apply_secret(secret)
        except ApiException as exc:
            if exc.status in (400, 403, 422):
                raise ConfigRefused(
                    f"the API server refused the Job's config Secret: {exc.reason}"
                ) from exc
            raise
        with self._lock:
            self._expires[uid] = until

    def forget(self, job: JSON | None) -> None:
        if job is not None:
            with self._lock:
                self._expires.pop(job["metadata"].get("uid", ""), None)


class Catalog:
    """The lookups a round needs beyond its own object, built once in main."""

    def __init__(self, kube: KubeApi, store: ForgeStore, settings: Settings) -> None:
        self.kube = kube  # single objects read as they are now (a startFrom's composite)
        self.namespaces = Namespaces(kube, settings)
        self.base_models = BaseModels(kube)
        self.institutions = Institutions(kube)
        self.configs = JobConfigs(kube, store)
