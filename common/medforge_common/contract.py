"""The job contract's shapes, as TypedDicts both sides type against: the plans the operator
writes for the training and merge Jobs (store URIs, signed into URLs when a Job may start) and
the result reference a Job leaves in its termination message. The job programs parse what
they read (medforge_trainer.config, medforge_merger.config); the operator builds these."""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict

JSON = dict[str, Any]


class FileRef(TypedDict):
    """One file: `get` or `put` (a store URI, in a plan), `url` (signed), or `path` (by hand)."""

    name: str
    get: NotRequired[str]
    put: NotRequired[str]
    url: NotRequired[str]
    path: NotRequired[str]


class ModelRef(TypedDict):
    name: NotRequired[str]
    digest: str  # sha256 of its manifest.json
    files: list[JSON]  # FileRef-shaped
    path: NotRequired[str]


class OutputRef(TypedDict):
    uri: str
    files: dict[str, JSON]  # file name -> {"put": uri}, then the PUT URL


class MergeInput(TypedDict):
    namespace: str
    name: str
    digest: str
    files: list[JSON]
    new: NotRequired[bool]  # merged before (False): never blamed for a regression
    task: NotRequired[str | None]
    privacy: NotRequired[JSON]  # the (epsilon, delta) the operator's ledger granted
    # The operator's verdict {institution, keyId} and its verified copy of the bundle (get).
    signature: NotRequired[JSON]
    # Trained from a revision (spec.startFrom): {revision, digest, stale}; merged relative to it.
    parent: NotRequired[JSON]


class RevisionRef(TypedDict):
    revision: int
    metrics: JSON
    digest: NotRequired[str]
    files: NotRequired[list[JSON]]


class CompositeRef(TypedDict):
    namespace: str
    name: str
    revision: int


class MergePlan(TypedDict):
    kind: str  # "merge"
    composite: CompositeRef
    baseModel: ModelRef
    strategy: JSON  # spec.strategy as the CRD validated it
    integration: str  # "full" or "incremental"
    inputs: list[MergeInput]
    gate: JSON
    output: OutputRef
    previous: NotRequired[RevisionRef]  # the revision replaced: the gate compares with it
    current: NotRequired[RevisionRef]  # the revision merged into (incremental)
    evaluation: NotRequired[list[JSON]]
    signing: NotRequired[JSON]  # spec.signing: {keyFile}, the forge's mounted private key
    branches: NotRequired[JSON]  # spec.branches.rank: branch inputs re-compressed to it


class ContributionRef(TypedDict):
    namespace: str
    name: str
    uid: str
    generation: int


class TrainPlan(TypedDict):
    kind: str  # "train"
    contribution: ContributionRef
    baseModel: ModelRef
    task: JSON
    dataset: JSON
    lora: JSON
    training: JSON
    distillation: JSON
    output: OutputRef
    privacy: NotRequired[JSON]  # spec.privacy: epsilon, delta, maxGradNorm, accountant
    signing: NotRequired[JSON]  # spec.signing: {keyFile}, the mounted private key's path
    # spec.startFrom, resolved: {composite, revision, digest, files: [{name, get}]}
    startFrom: NotRequired[JSON]


class ResultFileRef(TypedDict):
    name: str
    digest: str | None
    sizeBytes: NotRequired[int]


class ResultReference(TypedDict):
    """What a termination message carries when the full result went beside the artifact."""

    artifact: JSON  # digest and uri
    resultFile: ResultFileRef
    score: NotRequired[float]
