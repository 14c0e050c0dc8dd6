"""The custom resources as the operator reads them, typed in kopf's RawBody style: TypedDicts
(total=False: the API server may leave any field out) over plain dicts. A round's object is
one of these; a pure function that only reads it takes `Obj` (any of them, or a dict)."""

from __future__ import annotations

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
