"""BaseModel: where a platform-registered model lives in the forge store, its status, and what
it means for the Jobs that use it (pure functions)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from medforge_common.api import BaseModelPhase as Phase
from medforge_common.api import ConditionType as C
from medforge_common.api import Reason as R
from medforge_common.artifacts import MANIFEST_FILE
from medforge_common.uris import S3Uri
from medforge_operator import conditions
from medforge_operator.bodies import Obj
from medforge_operator.conditions import Cond, merge_conditions, now, steady

JSON = dict[str, Any]
PREFIX = "base-models/"


class BaseModelUnusable(Exception):
    """A BaseModel cannot be used (yet): missing, not verified, or pinned to another digest."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def store_prefix(bucket: str, obj: Obj) -> S3Uri:
    path = (obj.get("spec") or {}).get("path") or obj["metadata"]["name"]
    return S3Uri(bucket, f"{PREFIX}{path.strip('/')}/")


@dataclass(frozen=True)
class Resolved:
    """A verified BaseModel, as the Jobs that use it need it."""

    name: str
    digest: str
    uri: S3Uri
    files: tuple[str, ...]
    training: JSON = field(default_factory=dict)

    def file_refs(self) -> list[JSON]:
        """The model's files (manifest first) as a job plan lists them."""
        names = [MANIFEST_FILE, *[f for f in self.files if f != MANIFEST_FILE]]
        return [{"name": n, "get": str(self.uri.join(n))} for n in names]


def resolve(obj: Obj | None, name: str, pin: str | None, field_path: str) -> Resolved:
    """The usable model named `name`, or BaseModelUnusable with a reason and what to do."""
    if obj is None:
        raise BaseModelUnusable(
            R.BASE_MODEL_NOT_FOUND,
            f"{field_path}.name: no BaseModel {name!r} (kubectl get basemodels); the platform "
            "team registers base models",
        )
    st = obj.get("status") or {}
    if st.get("phase") != Phase.READY or st.get("observedGeneration") != obj["metadata"].get(
        "generation"
    ):
        ready = conditions.get(st.get("conditions"), C.READY) or {}
        detail = ready.get("reason") or R.NOT_VERIFIED_YET
        raise BaseModelUnusable(
            R.BASE_MODEL_NOT_READY, f"BaseModel {name} is not verified yet ({detail}); waiting"
        )
    digest = str(st.get("digest", ""))
    if pin and pin != digest:
        raise BaseModelUnusable(
            R.BASE_MODEL_DIGEST_MISMATCH,
            f"{field_path}.digest {pin[:19]}... differs from BaseModel {name}'s verified "
            f"digest {digest[:19]}...; waiting",
        )
    uri = st.get("uri") or ""
    bucket, _, key = str(uri).removeprefix("s3://").partition("/")
    return Resolved(
        name=name,
        digest=digest,
        uri=S3Uri(bucket, key),
        files=tuple(str(f) for f in st.get("files") or []),
        training=dict((obj.get("spec") or {}).get("training") or {}),
    )


def training_resources(resources: JSON, training: JSON, field_path: str) -> JSON:
    """A contribution's resources over its base model's defaults; the model's allowedQueues
    limit the queue (its first queue is the default). Raises ValueError naming the field."""
    out = dict(resources)
    for key, default in (
        ("gpus", training.get("gpus")),
        ("nodeSelector", training.get("nodeSelector")),
        ("tolerations", training.get("tolerations")),
        ("priorityClassName", training.get("priorityClassName")),
    ):
        if not out.get(key) and default:
            out[key] = default
    allowed = list(training.get("allowedQueues") or [])
    if allowed:
        queue = out.get("queueName") or allowed[0]
        if queue not in allowed:
            raise ValueError(
                f"{field_path}.queueName {queue!r} is not allowed for this base model; "
                f"use one of {', '.join(allowed)}"
            )
        out["queueName"] = queue
    return out


@dataclass
class Observation:
    generation: int
    uri: str
    verified: JSON | None = None  # {"digest", "sizeBytes", "files"}
    missing: str | None = None  # nothing uploaded yet at the prefix
    store_error: str | None = None
    invalid: str | None = None  # uploaded but wrong: digest, manifest, a file
    invalid_reason: str | None = None  # a signature's verdict, when that is what is wrong


def settled(obj: Obj) -> bool:
    st = obj.get("status") or {}
    return st.get("observedGeneration") == obj["metadata"].get("generation") and (
        st.get("phase") == Phase.READY
    )


def compute_status(old: JSON, o: Observation) -> JSON:
    status: JSON = {"observedGeneration": o.generation, "uri": o.uri}
    if o.verified is not None:
        status |= {"phase": Phase.READY, **o.verified, "verifiedAt": now()}
        msg = f"manifest {o.verified['digest'][:19]}... and {len(o.verified['files'])} file(s) verified"
        conds = [
            *steady(R.VERIFIED, msg),
            Cond(C.VERIFIED, True, R.DIGESTS_MATCH, msg),
        ]
    else:
        if o.invalid:
            reason, message = o.invalid_reason or R.VERIFICATION_FAILED, o.invalid
            phase = Phase.FAILED
        elif o.store_error:
            reason, message = R.STORE_UNREACHABLE, o.store_error + "; retrying"
            phase = Phase.PENDING
        else:
            reason = R.NOT_UPLOADED
            message = f"{o.uri} holds no manifest.json yet; upload the model there"
            phase = Phase.PENDING
        status["phase"] = phase
        conds = [
            Cond(C.READY, False, reason, message),
            Cond(
                C.RECONCILING,
                phase == Phase.PENDING,
                reason,
                message if phase == Phase.PENDING else "",
            ),
            Cond(
                C.STALLED, phase == Phase.FAILED, reason, message if phase == Phase.FAILED else ""
            ),
            Cond(C.VERIFIED, False if o.invalid else None, reason, message),
        ]
    status["conditions"] = merge_conditions(old.get("conditions"), conds, o.generation)
    return status
