"""One reconcile round of a LoRAContribution: observe, act (create or retire Jobs, verify the
artifact), then write the status computed by `contribution.compute_status`."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from kubernetes.client.exceptions import ApiException

from medforge_common.artifacts import DISTILLED_FILE
from medforge_common.uris import UriError
from medforge_operator import CONTRIBUTIONS, conditions, contribution, jobs, metrics, names
from medforge_operator.api import ConditionType, EventReason, Reason
from medforge_operator.api import ContributionPhase as Phase
from medforge_operator.basemodel import BaseModelUnusable
from medforge_operator.catalog import Catalog, ConfigRefused
from medforge_operator.kube import Kube
from medforge_operator.metrics import JOBS_CREATED
from medforge_operator.settings import Settings
from medforge_operator.store import (
    ForgeStore,
    InvalidManifest,
    StoreUnreachable,
    VerificationFailed,
)

JSON = dict[str, Any]
EventFn = Callable[[JSON, str, str, str], None]
log = logging.getLogger("medforge.contribution")


def settled(obj: JSON) -> bool:
    """Nothing left to do for this generation."""
    st = obj.get("status") or {}
    return st.get("observedGeneration") == obj["metadata"].get("generation") and st.get(
        "phase"
    ) in (Phase.SUCCEEDED, Phase.FAILED)


# Ready reasons of an unsettled contribution whose next step comes as an event of its Job or its
# pods (the label-selected watches): polling such a contribution would only repeat reads.
WATCH_DRIVEN = frozenset(
    {Reason.JOB_CREATED, Reason.TRAINING, Reason.CREATE_CONTAINER_CONFIG_ERROR}
)


def needs_polling(obj: JSON) -> bool:
    """Whether an unsettled contribution waits on something no watch reports: a store that is
    unreachable, a base model not uploaded yet, digests still to verify, or no status yet for
    this generation."""
    st = obj.get("status") or {}
    if settled(obj):
        return False
    if st.get("observedGeneration") != obj["metadata"].get("generation"):
        return True
    ready = conditions.get(st.get("conditions"), ConditionType.READY) or {}
    return ready.get("reason") not in WATCH_DRIVEN


def reconcile(
    obj: JSON, kube: Kube, store: ForgeStore, s: Settings, event: EventFn, cat: Catalog
) -> JSON:
    """Returns the status written (or the unchanged one)."""
    meta = obj["metadata"]
    ns, name, gen = meta["namespace"], meta["name"], int(meta["generation"])
    old = obj.get("status") or {}
    if settled(obj) and old.get("phase") == Phase.SUCCEEDED:
        return old
    job_name = names.training_job_name(name, gen)
    o = contribution.Observation(generation=gen, job_name=job_name, job=None)

    if gen > 1:  # a spec change retires the Jobs of older generations
        _retire_older(obj, job_name, kube, event)

    # Before the first status, the Job cannot exist yet unless an earlier round was cut short;
    # create_job returns the existing Job on a name conflict either way.
    o.job = kube.get_job(ns, job_name) if old.get("observedGeneration") == gen else None
    if o.job is not None and _stale_plan(obj, o.job, store, cat):
        # Still queued, but built for another base model or by other code: replaced, so that
        # what starts is what the spec and the BaseModel say now.
        kube.delete_job(ns, job_name)
        event(obj, "Normal", EventReason.RETIRED_JOB, f"replaced Job {job_name}: its plan changed")
        o.job = None
        return _write(obj, kube, event, old, o)
    if o.job is None and not (settled(obj) and old.get("phase") == Phase.FAILED):
        o.job = _create_job(obj, kube, store, s, cat, o)
    if o.job is not None and not jobs.owned_by(o.job, meta["uid"]):
        _not_ours(obj, o.job, kube, event, o)
        o.job = None
    if o.job is not None:
        _follow(obj, o, kube, store, cat)
    return _write(obj, kube, event, old, o)


def _write(obj: JSON, kube: Kube, event: EventFn, old: JSON, o: contribution.Observation) -> JSON:
    """Write the status the observation gives, with an Event when the phase moves."""
    ns, name, gen = obj["metadata"]["namespace"], obj["metadata"]["name"], o.generation
    new = contribution.compute_status(old, o)
    if contribution.status_changed(old, new):
        patch = dict(new)
        for key in set(old) - set(new) - {"kopf"}:
            patch[key] = None  # a merge patch removes keys only when told to
        kube.patch_status(CONTRIBUTIONS, ns, name, patch)
        if old.get("phase") != new.get("phase") or old.get("observedGeneration") != gen:
            ready = conditions.get(new["conditions"], ConditionType.READY) or {}
            kind = (
                "Warning"
                if new.get("phase") == Phase.FAILED
                or ready["reason"]
                in (Reason.CREATE_CONTAINER_CONFIG_ERROR, Reason.STORE_UNREACHABLE)
                else "Normal"
            )
            event(obj, kind, ready["reason"], f"{new.get('phase')}: {ready['message']}".strip())
    return new


def _stale_plan(obj: JSON, job: JSON, store: ForgeStore, cat: Catalog) -> bool:
    """Whether a Job of ours that never started differs from the plan it would get now (its
    BaseModel re-registered with another digest, say). A running Job is never replaced."""
    if not (jobs.owned_by(job, obj["metadata"]["uid"]) and jobs.never_started(job)):
        return False
    ref = obj["spec"].get("baseModel") or {}
    try:
        base = cat.base_models.resolve(
            str(ref.get("name", "")), ref.get("digest"), "spec.baseModel"
        )
    except BaseModelUnusable:
        return False  # nothing better to replace it with yet
    out = contribution.output_prefix(store.bucket, obj, int(obj["metadata"]["generation"]))
    return jobs.plan_of(job) != contribution.train_plan(obj, base, out)


def _follow(
    obj: JSON, o: contribution.Observation, kube: Kube, store: ForgeStore, cat: Catalog
) -> None:
    """The Job exists: its config Secret while it may start pods, its pods once it ran, the
    artifact once it completed."""
    job = o.job or {}
    if jobs.job_state(job) == "Active" and not jobs.never_started(job):
        try:
            cat.configs.ensure(job)  # fresh URLs for pods about to start
        except ConfigRefused as exc:
            o.build_error = (Reason.INVALID_SPEC, str(exc))
    elif jobs.job_state(job) != "Active":
        cat.configs.forget(job)
    if job.get("status") and not jobs.never_started(job):
        o.pods = kube.job_pods(obj["metadata"]["namespace"], job)
        if jobs.job_state(job) == "Complete":
            verify(obj, o, store)


def _retire_older(obj: JSON, job_name: str, kube: Kube, event: EventFn) -> None:
    ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    selector = f"{jobs.LABEL_OWNER}={names.label_value(name)},{jobs.LABEL_COMPONENT}=train"
    for stale in kube.list_jobs(ns, selector):
        if stale["metadata"]["name"] != job_name and jobs.owned_by(stale, obj["metadata"]["uid"]):
            kube.delete_job(ns, stale["metadata"]["name"])
            event(
                obj,
                "Normal",
                EventReason.RETIRED_JOB,
                f"deleted Job {stale['metadata']['name']} of an older spec",
            )


def _not_ours(
    obj: JSON, job: JSON, kube: Kube, event: EventFn, o: contribution.Observation
) -> None:
    """A Job with this generation's name that is not this object's: one of ours left by an
    object of the same name that was deleted (it is removed; the next round makes ours), or
    someone else's (reported, never adopted)."""
    name = job["metadata"]["name"]
    if jobs.made_by_us(job):
        kube.delete_job(obj["metadata"]["namespace"], name)
        event(obj, "Normal", EventReason.RETIRED_JOB, f"deleted Job {name} of an earlier object")
        return
    o.build_error = (
        Reason.JOB_NAME_TAKEN,
        f"a Job named {name} that MedForge did not create exists in this namespace; delete or "
        "rename it",
    )


def _create_job(
    obj: JSON,
    kube: Kube,
    store: ForgeStore,
    s: Settings,
    cat: Catalog,
    o: contribution.Observation,
) -> JSON | None:
    """The training Job, once the namespace is a member and the base model is verified; what
    stands in the way goes into the observation instead."""
    meta, spec = obj["metadata"], obj["spec"]
    if not cat.namespaces.managed(meta["namespace"]):
        o.build_error = (
            Reason.NAMESPACE_NOT_MANAGED,
            cat.namespaces.not_managed_message(meta["namespace"]),
        )
        return None
    ref = spec.get("baseModel") or {}
    try:
        base = cat.base_models.resolve(
            str(ref.get("name", "")), ref.get("digest"), "spec.baseModel"
        )
        output = contribution.output_prefix(store.bucket, obj, o.generation)
        plan = contribution.train_plan(obj, base, output)
        job = kube.create_job(contribution.training_job(obj, s, base, plan))
        JOBS_CREATED.labels("train").inc()
        return job
    except BaseModelUnusable as exc:
        o.build_error = (exc.reason, exc.message)
    except (UriError, ValueError) as exc:
        o.build_error = (Reason.INVALID_SPEC, str(exc))
    except ApiException as exc:
        if exc.status not in (400, 403, 422):
            raise
        # The API server (or its admission policy) refused the Job: a verdict on the spec.
        o.build_error = (
            Reason.INVALID_SPEC,
            f"the API server refused the Job: {_api_message(exc)}",
        )
    return None


def _api_message(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except (ValueError, AttributeError):
        return str(exc.reason)


def verify(obj: JSON, o: contribution.Observation, store: ForgeStore) -> None:
    """Check the uploaded files against the manifest before the contribution becomes Ready."""
    spec = obj["spec"]
    prefix = contribution.output_prefix(store.bucket, obj, o.generation)
    result = contribution.success_result(o.pods)
    if not o.pods:
        # The pods are gone (pod GC, a node scaled down): the artifact is still in the store,
        # and its manifest (checked file by file below) says what the result said.
        try:
            result = {"artifact": {"digest": store.manifest_digest(prefix)}}
        except StoreUnreachable as exc:
            o.verify_error = (Reason.STORE_UNREACHABLE, str(exc))
            return
        except VerificationFailed:
            result = None
    if result is None or "artifact" not in result:
        o.verify_error = (
            Reason.NO_RESULT,
            "the training Job succeeded but wrote no result JSON to its termination message",
        )
        return
    art = result["artifact"]
    expected_base = ((o.job or {}).get("metadata", {}).get("annotations") or {}).get(
        jobs.ANNOTATION_BASE_DIGEST, ""
    )
    try:
        manifest = store.verify_artifact(prefix, str(art.get("digest", "")))
    except StoreUnreachable as exc:
        o.verify_error = (Reason.STORE_UNREACHABLE, str(exc))
        return
    except VerificationFailed as exc:
        bad = (
            Reason.INVALID_MANIFEST if isinstance(exc, InvalidManifest) else Reason.DIGEST_MISMATCH
        )
        metrics.verification_failed("contribution", bad)
        o.verify_error = (bad, str(exc))
        return
    if manifest.base_model_digest != expected_base:
        metrics.verification_failed("contribution", Reason.BASE_MODEL_MISMATCH)
        o.verify_error = (
            Reason.BASE_MODEL_MISMATCH,
            f"the adapter was trained for base model "
            f"{manifest.base_model_digest[:19]}..., not BaseModel "
            f"{spec['baseModel']['name']}'s {expected_base[:19]}...",
        )
        return
    metrics.verified("contribution", sum(f.size for f in manifest.files))
    meta = manifest.meta
    artifact: JSON = {
        "uri": str(prefix),
        "digest": art["digest"],
        "sizeBytes": sum(f.size for f in manifest.files),
        "files": [f.name for f in manifest.files],
        "rank": meta.get("rank", spec.get("lora", {}).get("rank")),
        "targetModules": meta.get("targetModules", spec.get("lora", {}).get("targetModules")),
        "baseModelDigest": manifest.base_model_digest,
        "task": spec["task"]["name"],
    }
    if DISTILLED_FILE in artifact["files"]:
        d = next(f for f in manifest.files if f.name == DISTILLED_FILE)
        artifact["distilled"] = {"uri": str(prefix.join(d.name)), "digest": "sha256:" + d.sha256}
    o.verified = {
        "artifact": artifact,
        "metrics": result.get("metrics") or meta.get("metrics", {}),
        "training": contribution.training_figures(meta.get("training")),
    }
