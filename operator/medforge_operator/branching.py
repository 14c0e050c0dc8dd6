"""spec.startFrom: a contribution that trains on top of a composite revision, as a developer
branches from main (pure functions; the reconcilers look the objects up).

A revision may be a parent only when its composite publishes to the contribution's namespace
(spec.publish.namespaceSelector; none by default), it was accepted and is not withdrawn, it is
no output-level mixture, and every input it holds consented to publication
(spec.sharing.publish). The training Job then gets GET URLs for the revision's manifest and
merged update only (never its tasks file, which holds every hospital's distilled set), and the
composite merges the new adapter relative to that revision (medforge_merger.stacking)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from medforge_common.api import Reason as R
from medforge_common.api import RevisionState
from medforge_common.artifacts import ADAPTER_FILE, MANIFEST_FILE, MIXTURE_FILE
from medforge_common.uris import S3Uri
from medforge_operator import signing
from medforge_operator.bodies import Obj
from medforge_operator.composite.inputs import selector_matches
from medforge_operator.composite.withdrawal import parse_source

JSON = dict[str, Any]
LATEST = "latest"


class ParentRefused(Exception):
    """The revision cannot be trained from (yet): no Job is made; the reason goes to status."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Request:
    """spec.startFrom as written: the composite, and a revision number or None for latest."""

    namespace: str
    name: str
    revision: int | None

    @property
    def composite(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Parent:
    """The revision a contribution trains from, as the operator resolved it."""

    namespace: str
    name: str
    uid: str
    revision: int
    digest: str

    def record(self) -> JSON:
        """status.startFrom, and the manifest's meta.parent the trainer must write."""
        return {
            "composite": f"{self.namespace}/{self.name}",
            "revision": self.revision,
            "digest": self.digest,
        }

    def prefix(self, bucket: str) -> S3Uri:
        return signing.verified_revision(bucket, self.namespace, self.name, self.uid, self.revision)

    def given(self) -> list[str]:
        """The files a training Job reads: the manifest and the merged update."""
        return [MANIFEST_FILE, ADAPTER_FILE]

    def plan(self, bucket: str) -> JSON:
        """The training plan's startFrom (store URIs, signed inside the training grant)."""
        prefix = self.prefix(bucket)
        return self.record() | {
            "files": [{"name": f, "get": str(prefix.join(f))} for f in self.given()]
        }

    def ident(self) -> tuple[str, str, str, int]:
        """What the signing policy builds the revision's two keys from, itself."""
        return self.namespace, self.name, self.uid, self.revision


def requested(spec: JSON) -> Request | None:
    """spec.startFrom, or None. The CRD's pattern checks its shape; this is the last word."""
    start = spec.get("startFrom")
    if not isinstance(start, dict):
        return None
    ns, _, name = str(start.get("composite", "")).partition("/")
    if not ns or not name:
        raise ValueError("spec.startFrom.composite: expected namespace/name of a CompositeModel")
    rev = start.get("revision", LATEST)
    if rev == LATEST:
        return Request(ns, name, None)
    if isinstance(rev, bool) or not isinstance(rev, int) or rev < 1:
        raise ValueError(
            f"spec.startFrom.revision: expected a number from 1 or latest, got {rev!r}"
        )
    return Request(ns, name, rev)


def _revision(status: JSON, number: int | None) -> JSON | None:
    """The history entry of revision `number` (None: the one served now)."""
    current = status.get("current") or {}
    if number is None:
        number = current.get("revision")
        if number is None:
            return None
    return next((e for e in status.get("history") or [] if e.get("revision") == number), None)


def _kept(status: JSON, recorded: JSON | None) -> JSON | None:
    """The revision a running Job was given, once the history no longer lists it: what the
    operator recorded (its files: the two a Job reads), unless a withdrawal names it."""
    if not recorded:
        return None
    number = recorded.get("revision")
    for w in status.get("withdrawals") or []:
        if isinstance(w, dict) and number in (w.get("revisions") or []):
            return {"revision": number, "state": RevisionState.WITHDRAWN}
    return {
        "revision": number,
        "state": RevisionState.ACCEPTED,
        "digest": recorded.get("digest"),
        "files": [MANIFEST_FILE, ADAPTER_FILE],
        "kept": True,  # consent was checked when the Job was made
    }


def resolve(
    req: Request,
    namespace: str,
    composite: Obj | None,
    labels: dict[str, str],
    consents: Callable[[str, str, str], bool],
    base_model: str,
    recorded: JSON | None = None,
) -> Parent:
    """The parent revision for a contribution in `namespace` (its labels `labels`) that trains
    on BaseModel `base_model`, or ParentRefused. `consents(ns, name, digest)` tells whether a
    revision's input consented to publication; `recorded`: the revision its Job was given
    (status.startFrom), when signing again."""
    spec, status = (composite or {}).get("spec") or {}, (composite or {}).get("status") or {}
    selector = (spec.get("publish") or {}).get("namespaceSelector")
    if composite is None or selector is None or not selector_matches(selector, labels):
        # One answer for both: a hospital learns nothing of composites it may not train from.
        raise ParentRefused(
            R.PARENT_NOT_PUBLISHED,
            f"spec.startFrom: {req.composite} does not exist or does not publish its revisions "
            f"to namespace {namespace} (its spec.publish.namespaceSelector, set by the forge's "
            "owners)",
        )
    if (spec.get("baseModel") or {}).get("name") != base_model:
        raise ValueError(
            f"spec.startFrom: {req.composite} merges for BaseModel "
            f"{(spec.get('baseModel') or {}).get('name')!r}, not spec.baseModel.name {base_model!r}"
        )
    which = f"revision {req.revision}" if req.revision is not None else "its latest revision"
    entry = _revision(status, req.revision) or _kept(status, recorded)
    if entry is None:
        raise ParentRefused(
            R.PARENT_NOT_FOUND, f"spec.startFrom: {req.composite} has no {which} (yet)"
        )
    if entry.get("state") != RevisionState.ACCEPTED or not entry.get("digest"):
        raise ParentRefused(
            R.PARENT_NOT_ACCEPTED,
            f"spec.startFrom: {req.composite} revision {entry.get('revision')} is "
            f"{entry.get('state')}, not Accepted; start from latest or an accepted revision",
        )
    files = tuple(str(f) for f in entry.get("files") or [])
    if MIXTURE_FILE in files or ADAPTER_FILE not in files:
        raise ParentRefused(
            R.PARENT_IS_MIXTURE,
            f"spec.startFrom: {req.composite} revision {entry['revision']} is an output-level "
            "mixture: no single model to train on",
        )
    sources = [p for s in entry.get("inputs") or [] if (p := parse_source(str(s))) is not None]
    if not entry.get("kept") and (not sources or not all(consents(*p) for p in sources)):
        raise ParentRefused(
            R.PARENT_NOT_CONSENTED,
            f"spec.startFrom: not every input of {req.composite} revision {entry['revision']} "
            "consented to publication (spec.sharing.publish); it cannot be given",
        )
    meta = composite["metadata"]
    return Parent(
        meta["namespace"], meta["name"], meta["uid"], int(entry["revision"]), entry["digest"]
    )


def consented(contribution: JSON | None, digest: str) -> bool:
    """Whether a revision's input consents to its revisions being published: the hospital set
    spec.sharing.publish on the contribution (deleted: it left, and consents to nothing)."""
    del digest  # consent is the hospital's, for every update of that contribution
    if contribution is None:
        return False
    return ((contribution.get("spec") or {}).get("sharing") or {}).get("publish") is True
