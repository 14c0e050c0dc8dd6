"""One reconcile round of a LoRAContribution: observe, act (create or retire Jobs, verify the
artifact), then write the status computed by `contribution.compute_status`."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from kubernetes.client.exceptions import ApiException

from medforge_common.api import ConditionType, EventReason, Reason
from medforge_common.api import ContributionPhase as Phase
from medforge_common.attestation import VERIFIED
from medforge_common.uris import UriError
from medforge_operator import (
    COMPOSITES,
    CONTRIBUTIONS,
    PRIVACYBUDGETS,
    basemodel,
    branching,
    conditions,
    contribution,
    jobs,
    jobstatus,
    names,
    privacy_ledger,
    signing,
)
from medforge_operator.basemodel import BaseModelUnusable
from medforge_operator.bodies import ContributionBody, Obj
from medforge_operator.catalog import Catalog, ConfigRefused
from medforge_operator.kubeapi import KubeApi
from medforge_operator.metrics import JOBS_CREATED
from medforge_operator.settings import Settings
from medforge_operator.statuswrite import write_status
from medforge_operator.store import (
    ForgeStore,
)
from medforge_operator.verify_contribution import keep_verified, verify

JSON = dict[str, Any]
EventFn = Callable[[Obj, str, str, str], None]
log = logging.getLogger("medforge.contribution")


def settled(obj: Obj) -> bool:
    """Nothing left to do for this generation (a contribution verified before the operator
    kept verified copies still has its copy to make)."""
    st = obj.get("status") or {}
    if st.get("observedGeneration") != obj["metadata"].get("generation"):
        return False
    if st.get("phase") == Phase.SUCCEEDED:
        return contribution.has_verified_copy(obj)
    return st.get("phase") == Phase.FAILED


# Ready reasons of an unsettled contribution whose next step comes as an event of its Job or its
# pods (the label-selected watches): polling such a contribution would only repeat reads.
WATCH_DRIVEN = frozenset(
    {Reason.JOB_CREATED, Reason.TRAINING, Reason.CREATE_CONTAINER_CONFIG_ERROR}
)


def needs_polling(obj: Obj) -> bool:
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
    obj: ContributionBody,
    kube: KubeApi,
    store: ForgeStore,
    s: Settings,
    event: EventFn,
    cat: Catalog,
) -> JSON:
    """Returns the status written (or the unchanged one)."""
    meta = obj["metadata"]
    ns, name, gen = meta["namespace"], meta["name"], int(meta["generation"])
    old = obj.get("status") or {}
    if old.get("observedGeneration") == gen and old.get("phase") == Phase.SUCCEEDED:
        return old if settled(obj) else keep_verified(obj, kube, store, old)
    job_name = names.training_job_name(name, gen)
    o = contribution.Observation(generation=gen, job_name=job_name, job=None)
    if old.get("observedGeneration") == gen:
        o.record = recorded_job(old, job_name)
        o.privacy = old.get("privacy")

    if gen > 1:  # a spec change retires the Jobs of older generations
        _retire_older(obj, job_name, kube, event)

    # Before the first status, the Job cannot exist yet unless an earlier round was cut short.
    o.job = kube.get_job(ns, job_name) if old.get("observedGeneration") == gen else None
    if o.job is None and o.record is not None:
        o.record = None  # our Job is gone (deleted, or collected after it ended)
    if o.job is not None and not _is_recorded(o.job, o.record):
        _not_ours(obj, o.job, kube, event, o)
        return _write(obj, kube, event, old, o)
    if o.job is not None and _stale_plan(obj, o, store, cat):
        # Still queued, but built for another base model or by other code: replaced, so that
        # what starts is what the spec and the BaseModel say now.
        kube.delete_job(ns, job_name)
        event(obj, "Normal", EventReason.RETIRED_JOB, f"replaced Job {job_name}: its plan changed")
        o.job, o.record = None, None
        return _write(obj, kube, event, old, o)
    if o.job is None and not (settled(obj) and old.get("phase") == Phase.FAILED):
        job, created = _create_job(obj, kube, store, s, cat, o)
        if job is not None and not created:  # a Job of that name was made first
            _not_ours(obj, job, kube, event, o)
            return _write(obj, kube, event, old, o)
        o.job = job
    if o.job is not None:
        _follow(obj, o, kube, store, s, cat)
    return _write(obj, kube, event, old, o)


def recorded_job(status: JSON, job_name: str) -> JSON | None:
    """The operator's record of the Job it created under `job_name` (status.job), if any."""
    job = status.get("job") or {}
    if job.get("name") != job_name or not job.get("uid"):
        return None
    return {
        "uid": job["uid"],
        "planDigest": job.get("planDigest"),
        "baseModel": status.get("baseModel") or {},
        **({"parent": status["startFrom"]} if status.get("startFrom") else {}),
    }


def _is_recorded(job: JSON, record: JSON | None) -> bool:
    """A Job is the operator's only if its uid is the one recorded when it was created: labels,
    owner references and managedFields can all be written by whoever may create Jobs there."""
    return record is not None and job["metadata"].get("uid") == record.get("uid")


def _write(obj: Obj, kube: KubeApi, event: EventFn, old: JSON, o: contribution.Observation) -> JSON:
    """Write the status the observation gives, with an Event when the phase moves."""
    gen = o.generation
    new = contribution.compute_status(old, o)
    moved = old.get("phase") != new.get("phase") or old.get("observedGeneration") != gen
    if write_status(kube, CONTRIBUTIONS, obj, old, new) and moved:
        ready = conditions.get(new["conditions"], ConditionType.READY) or {}
        kind = (
            "Warning"
            if new.get("phase") == Phase.FAILED
            or ready["reason"] in (Reason.CREATE_CONTAINER_CONFIG_ERROR, Reason.STORE_UNREACHABLE)
            else "Normal"
        )
        event(obj, kind, ready["reason"], f"{new.get('phase')}: {ready['message']}".strip())
        sig = (new.get("artifact") or {}).get("signature") or {}
        if (obj.get("spec") or {}).get("signing") and sig.get("state") not in (None, VERIFIED):
            # Signed, yet not by a key its Institution lists: composites that require
            # signatures will exclude it, so its hospital hears why now.
            event(obj, "Warning", sig["state"], f"the adapter's signature: {sig.get('message')}")
    return new


def _stale_plan(obj: Obj, o: contribution.Observation, store: ForgeStore, cat: Catalog) -> bool:
    """Whether our Job that never started differs from the plan it would get now (its
    BaseModel re-registered with another digest, say). A running Job is never replaced."""
    if not jobstatus.never_started(o.job or {}):
        return False
    try:
        base = _base(obj, cat, None)
        parent = _parent(obj, cat, (o.record or {}).get("parent"))
    except branching.ParentRefused as exc:
        # Its revision was withdrawn (or rejected) while the Job waited: made again from now.
        return exc.reason == Reason.PARENT_NOT_ACCEPTED
    except (BaseModelUnusable, ValueError):
        return False  # nothing better to replace it with yet
    out = contribution.output_prefix(store.bucket, obj, int(obj["metadata"]["generation"]))
    plan = contribution.train_plan(obj, base, out, parent)
    return jobs.plan_digest(plan) != (o.record or {}).get("planDigest")


def _base(obj: Obj, cat: Catalog, pin: str | None) -> basemodel.Resolved:
    ref = obj["spec"].get("baseModel") or {}
    return cat.base_models.resolve(
        str(ref.get("name", "")), pin or ref.get("digest"), "spec.baseModel"
    )


def _parent(obj: Obj, cat: Catalog, recorded: JSON | None = None) -> branching.Parent | None:
    """The revision spec.startFrom names, resolved now (latest: the one served), or the one
    recorded when the Job was made: the same revision and digest, or ParentRefused."""
    req = branching.requested(obj["spec"])
    if req is None:
        return None
    if recorded:
        req = replace(req, revision=int(recorded.get("revision") or 0) or None)
    ns = obj["metadata"]["namespace"]
    kube = cat.kube
    parent = branching.resolve(
        req,
        ns,
        kube.get_object(COMPOSITES, req.namespace, req.name),
        cat.namespaces.labels(ns) or {},
        lambda n, m, d: branching.consented(kube.get_object(CONTRIBUTIONS, n, m), d),
        str((obj["spec"].get("baseModel") or {}).get("name", "")),
        recorded,
    )
    if recorded and parent.record() != recorded:
        raise branching.ParentRefused(
            Reason.PARENT_NOT_FOUND,
            f"spec.startFrom: {req.composite} revision {req.revision} is not the one the Job "
            "was given (the composite was made again); the next generation resolves it afresh",
        )
    return parent


def _follow(
    obj: Obj,
    o: contribution.Observation,
    kube: KubeApi,
    store: ForgeStore,
    s: Settings,
    cat: Catalog,
) -> None:
    """The Job exists and is ours: its config Secret while it may start pods, its pods once it
    ran, the artifact once it completed."""
    job = o.job or {}
    if jobstatus.job_state(job) == "Active" and not jobstatus.never_started(job):
        _sign(obj, o, store, s, cat)
    elif jobstatus.job_state(job) != "Active":
        cat.configs.forget(job)
    if job.get("status") and not jobstatus.never_started(job):
        o.pods = kube.job_pods(obj["metadata"]["namespace"], job)
        if jobstatus.job_state(job) == "Complete":
            verify(obj, o, store, cat.institutions.trusted)


def _sign(
    obj: Obj, o: contribution.Observation, store: ForgeStore, s: Settings, cat: Catalog
) -> None:
    """Fresh URLs for pods about to start. The plan is derived again from the object and the
    BaseModel the Job was given (its recorded digest), never read back from the Job, and
    signed only inside the training grant."""
    recorded_base = ((o.record or {}).get("baseModel") or {}).get("digest")
    try:
        base = _base(obj, cat, recorded_base)
        parent = _parent(obj, cat, (o.record or {}).get("parent"))
        out = contribution.output_prefix(store.bucket, obj, o.generation)
        plan = contribution.train_plan(obj, base, out, parent)
        grant = contribution.training_grant(store.bucket, obj, base, parent)
        cat.configs.ensure(o.job or {}, plan, grant, contribution.url_lifetime(obj["spec"], s))
    except (BaseModelUnusable, branching.ParentRefused) as exc:
        o.build_error = (exc.reason, exc.message)
    except ValueError as exc:
        o.build_error = (Reason.INVALID_SPEC, str(exc))
    except signing.SigningRefused as exc:
        log.warning("%s/%s: %s", obj["metadata"]["namespace"], obj["metadata"]["name"], exc)
        o.build_error = (Reason.SIGNING_REFUSED, str(exc))
    except ConfigRefused as exc:
        o.build_error = (Reason.INVALID_SPEC, str(exc))


def _retire_older(obj: Obj, job_name: str, kube: KubeApi, event: EventFn) -> None:
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
    obj: Obj, job: JSON, kube: KubeApi, event: EventFn, o: contribution.Observation
) -> None:
    """A Job with this generation's name whose uid the operator did not record: it never gets a
    config. One that claims to be ours (our labels, a controller reference to this object) is
    a look-alike, or ours from a round cut short before its status was written: either way it
    is deleted, and the next round makes one of record. Anything else is the tenant's own and
    never touched."""
    name = job["metadata"]["name"]
    if jobs.made_by_us(job) or jobs.owned_by(job, obj["metadata"]["uid"]):
        kube.delete_job(obj["metadata"]["namespace"], name)
        message = (
            f"deleted Job {name}: it carries this contribution's name and labels, but the "
            "operator has no record of creating it (a look-alike, or one left by a restart); "
            "a new one is created"
        )
        event(obj, "Warning", Reason.JOB_NOT_RECORDED, message)
        o.build_error = (Reason.JOB_NOT_RECORDED, message)
        return
    o.build_error = (
        Reason.JOB_NAME_TAKEN,
        f"a Job named {name} that MedForge did not create exists in this namespace; delete or "
        "rename it",
    )


def _create_job(
    obj: Obj,
    kube: KubeApi,
    store: ForgeStore,
    s: Settings,
    cat: Catalog,
    o: contribution.Observation,
) -> tuple[JSON | None, bool]:
    """(the Job, whether this round created it). The training Job, once the namespace is a member and the base model is verified; what
    stands in the way goes into the observation instead. The new Job's uid, plan digest and
    base model are recorded (status.job): nothing else makes a Job ours."""
    meta = obj["metadata"]
    if not cat.namespaces.managed(meta["namespace"]):
        o.build_error = (
            Reason.NAMESPACE_NOT_MANAGED,
            cat.namespaces.not_managed_message(meta["namespace"]),
        )
        return None, False
    try:
        base = _base(obj, cat, None)
        parent = _parent(obj, cat)
        output = contribution.output_prefix(store.bucket, obj, o.generation)
        plan = contribution.train_plan(obj, base, output, parent)
        if not _admitted(obj, kube, o):
            return None, False
        job, created = kube.create_job(contribution.training_job(obj, s, base))
    except (BaseModelUnusable, branching.ParentRefused) as exc:
        o.build_error = (exc.reason, exc.message)
        return None, False
    except (UriError, ValueError) as exc:
        o.build_error = (Reason.INVALID_SPEC, str(exc))
        return None, False
    except ApiException as exc:
        if exc.status not in (400, 403, 422):
            raise
        # The API server (or its admission policy) refused the Job: a verdict on the spec.
        o.build_error = (
            Reason.INVALID_SPEC,
            f"the API server refused the Job: {_api_message(exc)}",
        )
        return None, False
    if not created:  # someone else's Job took the name first: never given a config
        return job, False
    JOBS_CREATED.labels("train").inc()
    o.record = {
        "uid": job["metadata"]["uid"],
        "planDigest": jobs.plan_digest(plan),
        "baseModel": {"name": base.name, "digest": base.digest},
        **({"parent": parent.record()} if parent is not None else {}),
    }
    return job, True


def _admitted(obj: Obj, kube: KubeApi, o: contribution.Observation) -> bool:
    """The privacy ledger, before any Job exists: the epsilon is reserved in every budget of
    the namespace that covers the dataset (compare-and-swap: two contributions admitted at once
    never overspend; a conflict retries the round), or the refusal goes into the observation."""
    ns = obj["metadata"]["namespace"]
    try:
        budgets = kube.list_objects(PRIVACYBUDGETS, ns)
    except ApiException as exc:
        if exc.status != 404:
            raise
        budgets = []  # the PrivacyBudget CRD is not installed: no budget covers anything
    verdict = privacy_ledger.admit(obj, budgets, conditions.now())
    for budget, status in verdict.reserve:
        write_status(
            kube, PRIVACYBUDGETS, budget, budget.get("status") or {}, status, compare_and_swap=True
        )
    if not verdict.admitted:
        o.build_error = verdict.refusal
        return False
    o.privacy = verdict.grant or o.privacy
    return True


def _api_message(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except (ValueError, AttributeError):
        return str(exc.reason)
