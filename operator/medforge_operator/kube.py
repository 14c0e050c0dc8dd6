"""Kubernetes API access for the operator (the `kubernetes` client, plain dicts in and out)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator, Mapping
from typing import Any, cast

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from medforge_common.redact import redact, redact_all
from medforge_operator import GROUP, VERSION, jobs

JSON = dict[str, Any]

# (connect, read) seconds for every request: without one, a request to an API server that stops
# answering would hold its worker forever.
TIMEOUT = (5.0, 60.0)


def load_config() -> None:
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]


def _data(resp: Any) -> JSON:
    out: JSON = json.loads(resp.data)
    return out


def _drain(resp: Any) -> None:
    """Read a response we do not need to its end: an unread one keeps its connection out of the
    pool, and the next request pays for a new TLS handshake (one per Event, before this)."""
    resp.data  # noqa: B018


class Kube:
    def __init__(self, pool_size: int = 32) -> None:
        cfg = client.Configuration.get_default_copy()
        cfg.connection_pool_maxsize = pool_size
        api = client.ApiClient(cfg)
        self.batch = client.BatchV1Api(api)
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.coordination = client.CoordinationV1Api(api)

    # ----- Jobs and pods -----
    def get_job(self, namespace: str, name: str) -> JSON | None:
        try:
            return _data(
                self.batch.read_namespaced_job(
                    name, namespace, _preload_content=False, _request_timeout=TIMEOUT
                )
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def create_job(self, job: JSON) -> tuple[JSON, bool]:
        """Create the Job: (the Job, True); or (the one that already exists under its name,
        False), which the caller must not trust as its own: anyone who may create Jobs in the
        namespace may have made it, owner references and labels included."""
        ns = job["metadata"]["namespace"]
        try:
            resp = self.batch.create_namespaced_job(
                ns,
                job,  # type: ignore[arg-type]
                _preload_content=False,
                _request_timeout=TIMEOUT,
            )
            return _data(resp), True
        except ApiException as exc:
            if exc.status == 409:
                existing = self.get_job(ns, job["metadata"]["name"])
                if existing is not None:
                    return existing, False
            raise

    def list_jobs(self, namespace: str, selector: str) -> list[JSON]:
        resp = self.batch.list_namespaced_job(
            namespace, label_selector=selector, _preload_content=False, _request_timeout=TIMEOUT
        )
        items: list[JSON] = _data(resp)["items"]
        return items

    def delete_job(self, namespace: str, name: str) -> None:
        try:
            self.batch.delete_namespaced_job(
                name, namespace, propagation_policy="Background", _request_timeout=TIMEOUT
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    def job_pods(self, namespace: str, job: JSON) -> list[JSON]:
        """The pods this very Job controls: labelled with its uid and carrying it as their
        controller owner reference. A tenant can label a pod of its own as the Job's; the Job
        controller neither counts nor adopts one that names another controller, and neither do we."""
        uid = job["metadata"]["uid"]
        resp = self.core.list_namespaced_pod(
            namespace,
            label_selector=f"batch.kubernetes.io/controller-uid={uid}",
            _preload_content=False,
            _request_timeout=TIMEOUT,
        )
        items: list[JSON] = _data(resp)["items"]
        return [p for p in items if jobs.owned_by(p, uid)]

    def apply_secret(self, secret: JSON) -> None:
        """Create the Secret, or replace the data and annotations of ours under its name. The
        operator may create and patch Secrets but never read them (no get, list or watch)."""
        ns, name = secret["metadata"]["namespace"], secret["metadata"]["name"]
        try:
            _drain(
                self.core.create_namespaced_secret(
                    ns,
                    secret,  # type: ignore[arg-type]
                    _preload_content=False,
                    _request_timeout=TIMEOUT,
                )
            )
        except ApiException as exc:
            if exc.status != 409:
                raise
            # The owner too: a Job deleted and made again under its name hands the Secret on
            # (the garbage collector would otherwise remove it with the old Job).
            patch = {
                "metadata": {
                    "labels": secret["metadata"]["labels"],
                    "annotations": secret["metadata"]["annotations"],
                    "ownerReferences": secret["metadata"]["ownerReferences"],
                },
                "stringData": secret["stringData"],
            }
            _drain(
                self.core.patch_namespaced_secret(
                    name, ns, patch, _preload_content=False, _request_timeout=TIMEOUT
                )
            )

    # ----- custom objects (namespace "" for cluster-scoped kinds) -----
    def patch_status(
        self,
        plural: str,
        namespace: str,
        name: str,
        status: JSON,
        resource_version: str | None = None,
    ) -> None:
        """A merge patch of status. With `resource_version` it is a compare-and-swap: the API
        server answers 409 when the object changed since it was read (the round then runs
        again on what is there now), so two writers never overwrite each other's state."""
        # Whatever a round copied into status, no presigned query reaches it.
        body: JSON = {"status": redact_all(status)}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            if namespace:
                self.custom.patch_namespaced_custom_object_status(
                    GROUP,
                    VERSION,
                    namespace,
                    plural,
                    name,
                    body,
                    _request_timeout=TIMEOUT,
                )
            else:
                self.custom.patch_cluster_custom_object_status(
                    GROUP, VERSION, plural, name, body, _request_timeout=TIMEOUT
                )
        except ApiException as exc:
            if exc.status != 404:  # deleted meanwhile: nothing to report on
                raise

    def get_object(self, plural: str, namespace: str, name: str) -> JSON | None:
        try:
            if namespace:
                obj = self.custom.get_namespaced_custom_object(
                    GROUP, VERSION, namespace, plural, name, _request_timeout=TIMEOUT
                )
            else:
                obj = self.custom.get_cluster_custom_object(
                    GROUP, VERSION, plural, name, _request_timeout=TIMEOUT
                )
            return cast(JSON, obj)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def list_objects(
        self, plural: str, namespace: str | None = None, selector: str = ""
    ) -> list[JSON]:
        if namespace:
            resp = self.custom.list_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, label_selector=selector, _request_timeout=TIMEOUT
            )
        else:
            resp = self.custom.list_cluster_custom_object(
                GROUP, VERSION, plural, label_selector=selector, _request_timeout=TIMEOUT
            )
        return cast(list[JSON], cast(JSON, resp)["items"])

    def iter_objects(
        self, plural: str, namespace: str | None = None, selector: str = "", page: int = 500
    ) -> Iterator[JSON]:
        """Every object, a page at a time: a pass over every contribution in the cluster holds
        one page, not the whole list (tenants decide how many and how large they are)."""
        token: str | None = None
        while True:
            kw: JSON = {"label_selector": selector, "limit": page, "_request_timeout": TIMEOUT}
            if token:
                kw["_continue"] = token
            if namespace:
                resp = self.custom.list_namespaced_custom_object(
                    GROUP, VERSION, namespace, plural, **kw
                )
            else:
                resp = self.custom.list_cluster_custom_object(GROUP, VERSION, plural, **kw)
            body = cast(JSON, resp)
            yield from cast(list[JSON], body["items"])
            del resp, body["items"]
            token = (body.get("metadata") or {}).get("continue")
            if not token:
                return

    def post_event(self, obj: Mapping[str, Any], etype: str, reason: str, message: str) -> None:
        """A core/v1 Event about one of our objects (what `kubectl describe` shows)."""
        meta = obj["metadata"]
        namespace = meta.get("namespace") or "default"  # cluster-scoped kinds: as kubectl does
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion", f"{GROUP}/{VERSION}"),
                "kind": obj.get("kind", ""),
                "name": meta["name"],
                "namespace": meta.get("namespace", ""),
                "uid": meta.get("uid", ""),
            },
            "type": etype,
            "reason": reason,
            "message": redact(message)[:1024],
            "source": {"component": "medforge-operator"},
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            resp = self.core.create_namespaced_event(
                namespace,
                body,  # type: ignore[arg-type]
                _preload_content=False,
                _request_timeout=TIMEOUT,
            )
            _drain(resp)
        except ApiException as exc:
            if exc.status not in (403, 404):
                raise

    # ----- leases (leader election) -----
    def get_lease(self, namespace: str, name: str) -> JSON | None:
        try:
            resp = self.coordination.read_namespaced_lease(
                name, namespace, _preload_content=False, _request_timeout=TIMEOUT
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return _data(resp)

    def create_lease(self, namespace: str, lease: JSON) -> None:
        _drain(
            self.coordination.create_namespaced_lease(
                namespace,
                lease,  # type: ignore[arg-type]
                _preload_content=False,
                _request_timeout=TIMEOUT,
            )
        )

    def replace_lease(self, namespace: str, name: str, lease: JSON) -> None:
        """A write that fails with 409 when the Lease changed since it was read."""
        _drain(
            self.coordination.replace_namespaced_lease(
                name,
                namespace,
                lease,  # type: ignore[arg-type]
                _preload_content=False,
                _request_timeout=TIMEOUT,
            )
        )

    def namespace_labels(self, name: str) -> dict[str, str] | None:
        """A namespace's labels (None: no such namespace)."""
        try:
            resp = self.core.read_namespace(name, _preload_content=False, _request_timeout=TIMEOUT)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(_data(resp)["metadata"].get("labels") or {})
