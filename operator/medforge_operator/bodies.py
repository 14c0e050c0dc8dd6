"""The custom resources as the operator reads them, typed in kopf's RawBody style: TypedDicts
(total=False: the API server may leave any field out) over plain dicts. A round's object is
one of these; a pure function that only reads it takes `Obj` (any of them, or a dict)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, TypedDict

JSON = dict[str, Any]
Obj = Mapping[str, Any]


class ObjectMeta(TypedDict, total=False):
    name: str
    namespace: str
    uid: str
    generation: int
    resourceVersion: str
    creationTimestamp: str
    labels: dict[str, str]
    annotations: dict[str, str]
    ownerReferences: list[JSON]


class ContributionBody(TypedDict, total=False):
    apiVersion: str
    kind: str
    metadata: ObjectMeta
    spec: JSON  # the CRD's schema (crds/loracontributions.medforge.io.yaml) validated it
    status: JSON


class CompositeBody(TypedDict, total=False):
    apiVersion: str
    kind: str
    metadata: ObjectMeta
    spec: JSON
    status: JSON


class BaseModelBody(TypedDict, total=False):
    apiVersion: str
    kind: str
    metadata: ObjectMeta
    spec: JSON
    status: JSON


def plain(body: Any) -> dict[str, Any]:
    """A plain copy of a watched object, without what no round reads: managedFields and
    kubectl's copy of the last applied spec (as large as the spec itself)."""
    out: dict[str, Any] = json.loads(json.dumps(dict(body)))
    meta = out.get("metadata") or {}
    meta.pop("managedFields", None)
    (meta.get("annotations") or {}).pop("kubectl.kubernetes.io/last-applied-configuration", None)
    return out
