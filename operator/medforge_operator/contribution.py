"""LoRAContribution: the training Job's config and manifest, and the status (pure functions)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from medforge_common.api import ConditionType as C
from medforge_common.api import ContributionPhase as Phase
from medforge_common.api import Reason as R
from medforge_common.artifacts import CONTRIBUTION_FILES
from medforge_common.attestation import SIGNATURE_FILE
from medforge_common.contract import TrainPlan
from medforge_common.result import finite_number, read_result
from medforge_common.uris import S3Uri
from medforge_operator import basemodel, datajob, jobs, jobstatus, names, signing
from medforge_operator.bodies import Obj
from medforge_operator.conditions import (
    Cond,
    mark_false,
    mark_true,
    merge_conditions,
    progressing,
    stalled,
    steady,
)
from medforge_operator.datajob import dataset_wiring
from medforge_operator.jobstatus import PodSummary
from medforge_operator.settings import Settings

if TYPE_CHECKING:  # branching reads composites, which read contributions
    from medforge_operator.branching import Parent

JSON = dict[str, Any]
OUTPUT_FILES = CONTRIBUTION_FILES

# How many composites a contribution lists in status.usedBy.
USED_BY_LIMIT = 50


def output_prefix(bucket: str, obj: Obj, generation: int) -> S3Uri:
    """Where a generation's artifact goes. The object's uid is part of it: a contribution
    deleted and created again under its name never reads or overwrites its predecessor's."""
    meta = obj["metadata"]
    return signing.contribution_output(
        bucket, meta["namespace"], meta["name"], meta["uid"], generation
    )


def verified_prefix(bucket: str, obj: Obj, digest: str) -> S3Uri:
    """The operator's own copy of a verified artifact: what every later reader reads."""
    meta = obj["metadata"]
    return signing.verified_contribution(
        bucket, meta["namespace"], meta["name"], meta["uid"], digest
    )


def has_verified_copy(obj: Obj) -> bool:
    """Whether status.artifact.uri is the operator's own verified copy of this very object's
    artifact."""
    art = (obj.get("status") or {}).get("artifact") or {}
    meta = obj["metadata"]
    want = signing.verified_contribution(
        "",
        str(meta.get("namespace", "")),
        str(meta.get("name", "")),
        str(meta.get("uid", "")),
        str(art.get("digest", "")),
    ).key
    uri = str(art.get("uri", ""))
    return uri.startswith("s3://") and uri.split("/", 3)[-1] == want


def training_grant(
    bucket: str, obj: Obj, base: basemodel.Resolved, parent: Parent | None = None
) -> signing.Grant:
    return signing.training_grant(
        bucket, obj, base.uri, base.files, parent.ident() if parent is not None else None
    )


def train_plan(
    obj: Obj, base: basemodel.Resolved, output_uri: S3Uri, parent: Parent | None = None
) -> TrainPlan:
    """The training Job's config with store URIs in place of URLs, derived from the object and
    its verified BaseModel only (signed when the Job may start, inside the training grant;
    see medforge_operator.signing)."""
    spec = obj["spec"]
    meta = obj["metadata"]
    dataset, _, _, _ = dataset_wiring(spec)
    plan: TrainPlan = {
        "kind": "train",
        "contribution": {
            "namespace": meta["namespace"],
            "name": meta["name"],
            "uid": meta["uid"],
            "generation": meta["generation"],
        },
        "baseModel": {"name": base.name, "digest": base.digest, "files": base.file_refs()},
        "task": spec["task"],
        "dataset": dataset,
        "lora": spec.get("lora", {}),
        "training": spec.get("training", {}),
        "distillation": spec.get("distillation", {}),
        "output": {
            "uri": str(output_uri),
            "files": {f: jobs.put_ref(output_uri.join(f)) for f in OUTPUT_FILES},
        },
    }
    if spec.get("signing"):
        plan["signing"] = {"keyFile": datajob.SIGNING_KEY}
        plan["output"]["files"][SIGNATURE_FILE] = jobs.put_ref(output_uri.join(SIGNATURE_FILE))
    if spec.get("privacy"):
        plan["privacy"] = spec["privacy"]  # the trainer stops before it spends more
    if parent is not None:  # the revision resolved when the Job was made, never re-read
        plan["startFrom"] = parent.plan(output_uri.bucket)
    return plan


def url_lifetime(spec: JSON, settings: Settings) -> int:
    """As long as the Job may run (its deadline, with ten minutes to spare) and no longer;
    the operator's setting for Jobs without a deadline. SigV4 allows at most seven days."""
    deadline = spec.get("activeDeadlineSeconds")
    if deadline:
        return int(min(int(deadline) + 600, 7 * 24 * 3600))
    return settings.presign_expiry_seconds


def training_job(obj: Obj, settings: Settings, base: basemodel.Resolved) -> JSON:
    """Raises ValueError (naming the field) when the spec breaks the base model's limits."""
    meta = obj["metadata"]
    return datajob.data_job(
        obj,
        names.training_job_name(meta["name"], meta["generation"]),
        "train",
        list(settings.trainer_command),
        settings,
        base,
        labels={jobs.LABEL_GENERATION: str(meta["generation"])},
        backoff_limit=int(obj["spec"].get("backoffLimit", 2)),
        active_deadline=obj["spec"].get("activeDeadlineSeconds"),
        signing_key=True,
    )


@dataclass
class Observation:
    """What the operator saw this round; the status is a pure function of it."""

    generation: int
    job_name: str
    job: JSON | None
    pods: list[JSON] = field(default_factory=list)
    # (reason, message): the spec cannot become a Job yet (the message names the field)
    build_error: tuple[str, str] | None = None
    # What the privacy ledger granted this generation (status.privacy), once admitted.
    privacy: JSON | None = None
    verified: JSON | None = None  # {"artifact": ..., "metrics": ...} once verification passed
    verify_error: tuple[str, str] | None = None  # (reason, message)
    # The operator's own record of the Job it created for this generation (uid, planDigest,
    # baseModel): the only thing that makes a Job of that name its own. Kept in status.job.
    record: JSON | None = None


TRAINING_FIGURES = ("imagesPerSecond", "seconds", "loss")
TRAINING_COUNTS = ("epochs", "batchSize")  # integers in the CRD: 3.5 would fail every patch
# The validation metrics a trainer reports; nothing else from a result reaches status or the
# metrics' label sets.
VALIDATION_METRICS = ("accuracy", "f1", "auc", "samples")


def training_figures(meta: Any) -> JSON:
    """The trainer's own figures from the verified manifest: finite numbers only, counts as
    whole numbers (they become status fields and metrics; a hostile manifest must not put
    anything else there)."""
    if not isinstance(meta, dict):
        return {}
    out: JSON = {}
    for key in TRAINING_FIGURES:
        v = meta.get(key)
        if finite_number(v) is not None:
            out[key] = v
    for key in TRAINING_COUNTS:
        n = finite_number(meta.get(key))
        if n is not None and n >= 0 and n == int(n) and n < 2**53:
            out[key] = int(n)
    if isinstance(meta.get("device"), str) and meta["device"] in ("cpu", "cuda", "mps"):
        out["device"] = meta["device"]
    return out


def validation_metrics(metrics: Any) -> JSON:
    """The known validation metrics, finite numbers only."""
    if not isinstance(metrics, dict):
        return {}
    return {k: metrics[k] for k in VALIDATION_METRICS if finite_number(metrics.get(k)) is not None}


_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class InvalidResult(ValueError):
    """What a Job reported does not have the shape of a result; the message names the field."""


def announced_digest(result: Any) -> str:
    """The artifact digest a training Job's result announces, or InvalidResult naming the
    field. A termination message is the tenant's to write: it is parsed as untrusted input."""
    if not isinstance(result, dict):
        raise InvalidResult("the termination message is not a JSON object")
    art = result.get("artifact")
    if not isinstance(art, dict):
        raise InvalidResult("artifact: must be an object with the manifest's digest")
    digest = art.get("digest")
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise InvalidResult("artifact.digest: must be sha256: and 64 hexadecimal digits")
    return digest


def manifest_matches_spec(
    meta: Any, spec: JSON, files: list[str] | None = None, parent: JSON | None = None
) -> str | None:
    """Why a verified manifest does not describe this contribution's task (and the revision
    its Job was given, `parent`), if it does not. Its files are the contract's alone (what
    else would become status is the tenant's choice)."""
    task = spec.get("task") or {}
    unknown = sorted(set(files or []) - set(OUTPUT_FILES) - {"manifest.json"})
    if unknown:
        return f"files: {unknown[0][:64]!r} is not a contribution file ({', '.join(OUTPUT_FILES)})"
    if not isinstance(meta, dict):
        return "meta: must be an object"
    if meta.get("task") != task.get("name"):
        return (
            f"meta.task {str(meta.get('task'))[:64]!r} is not spec.task.name {task.get('name')!r}"
        )
    if meta.get("classes") != list(task.get("classes") or []):
        return "meta.classes differ from spec.task.classes (names and order)"
    if meta.get("parent") != (parent or None):
        # Merged relative to a revision it did not learn on, an update would be wrong there.
        want = f"{parent['composite']} revision {parent['revision']}" if parent else "none"
        return f"meta.parent is not the revision the Job was given ({want})"
    return None


def _count(value: Any) -> int:
    n = finite_number(value)
    return int(n) if n is not None and n >= 0 else 0


def _job_summary(o: Observation, pods: PodSummary) -> JSON | None:
    record = o.record or {}
    if o.job is None and not record:
        return None
    summary: JSON = {
        "name": o.job_name,
        "uid": record.get("uid"),
        "planDigest": record.get("planDigest"),
    }
    if o.job is not None:
        js = o.job.get("status") or {}
        summary["attempts"] = max(
            pods["attempts"],
            _count(js.get("failed")) + _count(js.get("succeeded")) + _count(js.get("active")),
        )
        for key in ("startTime", "completionTime"):
            if jobs.parse_time(js.get(key)) is not None:
                summary[key] = js[key]
    return {k: v for k, v in summary.items() if v is not None}


def _stalled(
    reason: str, message: str, trained: bool | None = False, verified: bool | None = None
) -> list[Cond]:
    return [
        *stalled(reason, message),
        Cond(C.TRAINED, trained, reason, ""),
        Cond(
            C.ARTIFACT_VERIFIED,
            verified,
            reason if verified is False else R.NOT_YET,
            message if verified is False else "",
        ),
    ]


def _completed(o: Observation, status: JSON) -> tuple[Phase, list[Cond]]:
    """The Job completed: verifying, verified, or refused."""
    if o.verify_error and o.verify_error[0] == R.STORE_UNREACHABLE:
        reason, message = o.verify_error
        return Phase.TRAINING, [
            Cond(C.READY, False, reason, message),
            Cond(C.RECONCILING, True, R.VERIFYING, message + "; retrying"),
            Cond(C.STALLED, False, R.VERIFYING, ""),
            Cond(C.TRAINED, True, R.JOB_COMPLETE, ""),
            Cond(C.ARTIFACT_VERIFIED, None, reason, message),
        ]
    if o.verify_error:
        return Phase.FAILED, _stalled(*o.verify_error, trained=True, verified=False)
    if o.verified:
        status["artifact"] = o.verified["artifact"]
        status["metrics"] = o.verified.get("metrics", {})
        if o.verified.get("training"):
            status["training"] = o.verified["training"]
        msg = f"adapter {o.verified['artifact']['digest'][:19]}... verified"
        return Phase.SUCCEEDED, [
            *steady(R.VERIFIED, msg, quiet=R.DONE),
            Cond(C.TRAINED, True, R.JOB_COMPLETE, ""),
            Cond(C.ARTIFACT_VERIFIED, True, R.DIGESTS_MATCH, msg),
        ]
    return Phase.TRAINING, [
        Cond(C.READY, False, R.VERIFYING, "checking the uploaded files' digests"),
        mark_true(C.RECONCILING, R.VERIFYING),
        mark_false(C.STALLED, R.VERIFYING),
        Cond(C.TRAINED, True, R.JOB_COMPLETE, ""),
        Cond(C.ARTIFACT_VERIFIED, None, R.VERIFYING, ""),
    ]


def _in_flight(o: Observation, pods: PodSummary) -> tuple[Phase, list[Cond]]:
    """No verdict yet: the Job waits for a node (or Kueue), or trains."""
    # A pod that already ended (the Job controller has not caught up yet, or a retry is due)
    # still means training is under way: the phase must not flap back to Pending.
    ended = pods["success_message"] is not None or pods["failure_message"] is not None
    running = pods["running"] or ended
    reason = R.TRAINING if running else (R.JOB_CREATED if o.job is not None else R.CREATING_JOB)
    msg = f"Job {o.job_name} " + ("is training" if running else "is waiting for a node")
    return Phase.TRAINING if running else Phase.PENDING, [
        *progressing(reason, msg),
        Cond(C.TRAINED, None, reason, ""),
        Cond(C.ARTIFACT_VERIFIED, None, R.NOT_YET, ""),
    ]


def compute_status(old: JSON, o: Observation) -> JSON:
    """The new status of a LoRAContribution."""
    pods = jobstatus.pod_summary(o.pods)
    state = jobstatus.job_state(o.job)
    status: JSON = {"observedGeneration": o.generation}
    if (summary := _job_summary(o, pods)) is not None:
        status["job"] = summary
    if o.record and o.record.get("baseModel"):
        status["baseModel"] = dict(o.record["baseModel"])  # what the operator gave the Job
    if o.record and o.record.get("parent"):
        status["startFrom"] = dict(o.record["parent"])  # the revision it trains from
    if old.get("usedBy"):
        status["usedBy"] = old["usedBy"]  # written by the composites that merged it
    if o.privacy:
        status["privacy"] = o.privacy
    phase: Phase
    if o.build_error:
        # Not terminal: the base model may be registered later, the namespace labelled; the
        # resync retries.
        phase, conds = Phase.PENDING, _stalled(*o.build_error)
    elif state == "Failed":
        reason, message = jobstatus.job_failure(o.job or {})
        detail = pods["failure_message"] or message
        attempts = (summary or {}).get("attempts", 0)
        phase = Phase.FAILED
        conds = _stalled(reason, f"training failed after {attempts} attempt(s): {detail}".strip())
    elif state == "Complete":
        phase, conds = _completed(o, status)
    elif pods["config_error"]:
        phase = Phase.PENDING
        conds = _stalled(R.CREATE_CONTAINER_CONFIG_ERROR, pods["config_error"], trained=None)
    else:
        phase, conds = _in_flight(o, pods)
    status["phase"] = phase
    status["conditions"] = merge_conditions(old.get("conditions"), conds, o.generation)
    return status


def success_result(pods: list[JSON]) -> JSON | None:
    """The result JSON the trainer wrote to its termination message (untrusted: see
    announced_digest)."""
    message = jobstatus.pod_summary(pods)["success_message"]
    return read_result(message) if message else None
