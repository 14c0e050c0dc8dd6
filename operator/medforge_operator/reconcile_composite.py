"""One reconcile round of a CompositeModel, in the contribution's shape: observe (the pending
revision's Job and how it ended, the base model, the shared contributions), act (start the next
revision), then write the status that `composite.compute_status` computes from the observation."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from kubernetes.client.exceptions import ApiException

from medforge_common.api import (
    CompositePhase,
    EventReason,
    InputReason,
    InputState,
    RevisionState,
)
from medforge_common.api import Reason as R
from medforge_common.uris import UriError
from medforge_operator import (
    COMPOSITES,
    CONTRIBUTIONS,
    composite,
    jobs,
    jobstatus,
    names,
    reconcile_evaluation,
    reconcile_withdrawal,
    revision_outcome,
    signing,
)
from medforge_operator.basemodel import BaseModelUnusable
from medforge_operator.bodies import CompositeBody, Obj
from medforge_operator.catalog import Catalog, ConfigRefused
from medforge_operator.conditions import merge_conditions, now, stalled
from medforge_operator.contribution import USED_BY_LIMIT
from medforge_operator.kubeapi import KubeApi
from medforge_operator.metrics import JOBS_CREATED, REVISIONS
from medforge_operator.revision_outcome import outcome
from medforge_operator.settings import Settings
from medforge_operator.statuswrite import apply_changes, write_status
from medforge_operator.store import ForgeStore

JSON = dict[str, Any]
EventFn = Callable[[Obj, str, str, str], None]
log = logging.getLogger("medforge.composite")


def matching_contributions(obj: Obj, kube: KubeApi, s: Settings, cat: Catalog) -> list[JSON]:
    """The contributions whose owners shared them with this composite, narrowed by its label
    and namespace selectors. Nothing else is ever read into its status or its merge Jobs."""
    meta = obj["metadata"]
    me = f"{meta['namespace']}/{meta['name']}"
    spec = obj["spec"].get("contributions") or {}
    selector = composite.selector_string(spec.get("selector"))
    ns_sel = spec.get("namespaceSelector")
    # A page at a time, keeping only those that consented to this composite.
    found = [
        c
        for ns in (s.namespaces or (None,))
        for c in kube.iter_objects(CONTRIBUTIONS, ns, selector)
        if composite.shares_with(c, me)
    ]
    if ns_sel:
        found = [
            c
            for c in found
            if composite.selector_matches(
                ns_sel, cat.namespaces.labels(c["metadata"]["namespace"]) or {}
            )
        ]
    return found


def reconcile(
    obj: CompositeBody, kube: KubeApi, store: ForgeStore, s: Settings, event: EventFn, cat: Catalog
) -> None:
    """The work queue runs one round per composite at a time: no lock needed here."""
    meta = obj["metadata"]
    fresh = kube.get_object(COMPOSITES, meta["namespace"], meta["name"])
    if fresh is None:
        return
    refusal = _refusal(fresh, s, cat)
    if refusal is not None:
        _write(fresh, kube, refusal_status(fresh, *refusal))
        return
    at = now()
    o = observe(fresh, kube, store, s, cat, at)
    spec = fresh["spec"]
    old = fresh.get("status") or {}
    changes = dict(o.withdrawal.changes) if o.withdrawal else {}
    before = apply_changes(old, changes)
    changes |= composite.settle(before, o, int(spec.get("historyLimit", 10)), at)
    settled = {**fresh, "status": apply_changes(old, changes)}
    changes |= composite.abandoned_rebuild(settled, o, at)
    settled = {**fresh, "status": apply_changes(old, changes)}
    plan = composite.next_plan(settled, o, at)
    if plan is not None and o.base is not None:
        _start(settled, plan, kube, store, s, cat, o)
        if o.started is not None:
            changes |= {"revision": plan.revision, "pendingRevision": o.started}
            settled = {**fresh, "status": apply_changes(old, changes)}
    changes |= reconcile_withdrawal.erase_due(settled, kube, store, event, at)
    settled = {**fresh, "status": apply_changes(old, changes)}
    new = composite.compute_status(old, settled, o, changes)
    _write(fresh, kube, new)
    _announce(fresh, old, o, plan, kube, event, cat)
    _tell_excluded(fresh, old, new, o, event)
    reconcile_withdrawal.tell(fresh, o, event)
    for args in o.site_events:
        event(*args)


def _write(obj: Obj, kube: KubeApi, new: JSON) -> None:
    # Compare-and-swap: a pendingRevision written by anyone since we read is never lost.
    write_status(kube, COMPOSITES, obj, obj.get("status") or {}, new, compare_and_swap=True)


def _refusal(obj: Obj, s: Settings, cat: Catalog) -> tuple[str, str] | None:
    """Why this composite may not merge anything where it is, if it may not."""
    ns = obj["metadata"]["namespace"]
    if ns not in s.forge_namespaces:
        return (
            R.NOT_A_FORGE_NAMESPACE,
            f"namespace {ns} is not a forge namespace: CompositeModels are reconciled only in "
            "the namespaces of the operator's MEDFORGE_FORGE_NAMESPACES setting (chart value "
            "forgeNamespaces)",
        )
    if not cat.namespaces.managed(ns):
        return (R.NAMESPACE_NOT_MANAGED, cat.namespaces.not_managed_message(ns))
    return None


def refusal_status(obj: Obj, reason: str, message: str) -> JSON:
    """Status of a composite the operator refuses to serve: no inputs, no Jobs."""
    gen = int(obj["metadata"]["generation"])
    conds = stalled(reason, message)
    return {
        "observedGeneration": gen,
        "phase": CompositePhase.FAILED,
        "conditions": merge_conditions((obj.get("status") or {}).get("conditions"), conds, gen),
    }


def observe(
    obj: Obj, kube: KubeApi, store: ForgeStore, s: Settings, cat: Catalog, at: str
) -> composite.Observation:
    """Everything the round decides on. Inputs that left are found first: a pending merge that
    reads one is stopped before anything is signed for it. A pending revision whose Job ended
    is read here: its pods' result and the uploaded composite, copied and checked in the store."""
    meta, spec = obj["metadata"], obj["spec"]
    o = composite.Observation(generation=int(meta["generation"]))
    try:
        o.base = cat.base_models.resolve(spec["baseModel"]["name"], None, "spec.baseModel")
    except BaseModelUnusable as exc:
        o.base_problem = (exc.reason, exc.message)
    o.contribs = matching_contributions(obj, kube, s, cat)
    if spec.get("requireSignatures"):
        o.trust = cat.institutions.active_ids()
    pending = (obj.get("status") or {}).get("pendingRevision")
    reconcile_withdrawal.departures(obj, o, kube, at)
    if o.withdrawal is not None and o.withdrawal.cancel and pending:
        reconcile_withdrawal.cancel(obj, pending, kube, cat)
        reconcile_evaluation.stop(obj, pending, kube)
        return o
    if not pending:
        return o
    if pending.get("evaluation"):  # merged and past the summary gate: at the sites
        reconcile_evaluation.advance(obj, pending, o, kube, store, s, cat, at)
        return o
    job_name = names.merge_job_name(meta["name"], pending["revision"])
    o.job = kube.get_job(meta["namespace"], job_name)
    if o.job is not None and o.job["metadata"].get("uid") != pending.get("jobUid"):
        # Not the Job this revision recorded (a look-alike, or one left by an object of the
        # same name): the revision starts over under a new number; one that claims to be ours
        # is removed, others are never touched.
        if jobs.made_by_us(o.job) or jobs.owned_by(o.job, meta["uid"]):
            kube.delete_job(meta["namespace"], job_name)
        o.job = None
    if o.job is not None and jobstatus.job_state(o.job) == "Active":
        if not jobstatus.never_started(o.job):
            _sign(obj, pending, o, store, s, cat)
    elif o.job is not None:
        uri = composite.output_prefix(store.bucket, obj, pending["revision"])
        verified = composite.verified_prefix(store.bucket, obj, pending["revision"])
        previous = ((obj.get("status") or {}).get("current") or {}).get("metrics") or {}
        keys = cat.institutions.trusted(meta["namespace"]) if spec.get("signing") else []
        o.outcome = outcome(
            o.job, kube, store, meta["namespace"], uri, verified, spec, previous, keys
        )
        o.outcome.uri, o.outcome.job_name = str(verified), job_name
        reconcile_evaluation.hand_over(obj, pending, o, kube, store, s, cat, at)
    return o


def _sign(
    obj: Obj,
    pending: JSON,
    o: composite.Observation,
    store: ForgeStore,
    s: Settings,
    cat: Catalog,
) -> None:
    """Fresh URLs for the merge Job's pods, for the plan derived again from the composite, its
    recorded base model and the inputs that still consent (never read back from the Job),
    inside the merge grant."""
    try:
        base = cat.base_models.resolve(
            obj["spec"]["baseModel"]["name"], pending.get("baseDigest"), "spec.baseModel"
        )
        new, every = composite.merge_inputs(pending, o.contribs, base.digest)
        plan = composite.Plan(
            int(pending["revision"]), new, every, replacement=bool(pending.get("replacement"))
        )
        out = composite.output_prefix(store.bucket, obj, plan.revision)
        job_plan = composite.merge_plan(obj, plan, base, out, store.bucket)
        grant = composite.merge_grant(store.bucket, obj, plan, base)
        cat.configs.ensure(o.job or {}, job_plan, grant, s.presign_expiry_seconds)
    except BaseModelUnusable as exc:
        o.start_problem = (exc.reason, exc.message)
    except (UriError, ValueError) as exc:
        o.start_problem = (R.INVALID_SPEC, str(exc))
    except signing.SigningRefused as exc:
        log.warning("%s/%s: %s", obj["metadata"]["namespace"], obj["metadata"]["name"], exc)
        o.start_problem = (R.SIGNING_REFUSED, str(exc))
    except ConfigRefused as exc:
        o.start_problem = (R.INVALID_SPEC, str(exc))


def _start(
    obj: Obj,
    plan: composite.Plan,
    kube: KubeApi,
    store: ForgeStore,
    s: Settings,
    cat: Catalog,
    o: composite.Observation,
) -> None:
    """Create the revision's merge Job (its config Secret too, unless Kueue queues it); what
    happened goes into the observation. The Job's uid is recorded in pendingRevision: nothing
    else makes a Job of that name this revision's."""
    if o.base is None:
        return
    out = composite.output_prefix(store.bucket, obj, plan.revision)
    try:
        job_plan = composite.merge_plan(obj, plan, o.base, out, store.bucket)
        job, created = kube.create_job(composite.merge_job(obj, plan, s, job_plan))
    except (UriError, ValueError) as exc:
        o.start_problem = (R.INVALID_SPEC, str(exc))
        return
    except ApiException as exc:
        if exc.status not in (400, 403, 422):
            raise
        o.start_problem = (R.INVALID_SPEC, f"the API server refused the merge Job: {exc.reason}")
        return
    if not created:
        name = job["metadata"]["name"]
        if jobs.made_by_us(job) or jobs.owned_by(job, obj["metadata"]["uid"]):
            kube.delete_job(obj["metadata"]["namespace"], name)
            o.start_problem = (
                R.JOB_NOT_RECORDED,
                f"deleted Job {name}: it claims to be this composite's, but no revision "
                "recorded it; the revision starts again",
            )
        else:
            o.start_problem = (
                R.JOB_NAME_TAKEN,
                f"a Job named {name} that MedForge did not create exists in this namespace; "
                "delete or rename it",
            )
        return
    JOBS_CREATED.labels("merge").inc()
    incremental = job_plan["integration"] == "incremental"
    o.started = _pending_record(plan, o.base.digest, job["metadata"]["uid"], incremental)
    if jobstatus.job_state(job) == "Active" and not jobstatus.never_started(job):
        o.job = job
        _sign(obj, o.started, o, store, s, cat)


def _pending_record(
    plan: composite.Plan, base_digest: str, job_uid: str, incremental: bool
) -> JSON:
    """status.pendingRevision of a merge Job just created."""
    digest = [c["status"]["artifact"]["digest"] for c in plan.all_inputs]
    return {
        "revision": plan.revision,
        "digests": [c["status"]["artifact"]["digest"] for c in plan.new],
        "inputs": digest,
        # Who each input is: a withdrawal finds the merges that read it.
        "sources": [
            composite.source(c["metadata"]["namespace"], c["metadata"]["name"], d)
            for c, d in zip(plan.all_inputs, digest, strict=True)
        ],
        **({"replacement": True} if plan.replacement else {}),
        "baseDigest": base_digest,
        "jobUid": job_uid,
        "incremental": incremental,
        "startedAt": now(),
    }


def _announce(
    obj: Obj,
    old: JSON,
    o: composite.Observation,
    plan: composite.Plan | None,
    kube: KubeApi,
    event: EventFn,
    cat: Catalog,
) -> None:
    """Events and the contributions' side of a finished revision."""
    pending = old.get("pendingRevision")
    outcome = o.outcome
    if pending and outcome is not None and outcome.state != R.STORE_UNREACHABLE:
        cat.configs.forget(o.job)  # its URLs are no longer needed
        REVISIONS.labels(outcome.state.lower()).inc()
        kind = "Normal" if outcome.state == RevisionState.ACCEPTED else "Warning"
        event(
            obj,
            kind,
            f"Revision{outcome.state}",
            f"revision {pending['revision']}: {outcome.message}",
        )
        _tell_contributions(obj, pending, outcome, kube, event)
    if plan is not None and o.started is not None:
        event(
            obj,
            "Normal",
            EventReason.REVISION_STARTED,
            f"merging revision {plan.revision}: the {len(plan.all_inputs)} remaining input(s) "
            "afresh, replacing the revisions that hold a withdrawn input"
            if plan.replacement
            else f"merging revision {plan.revision} with {len(plan.new)} new contribution(s)",
        )


def _tell_excluded(
    obj: Obj, old: JSON, new: JSON, o: composite.Observation, event: EventFn
) -> None:
    """The operator's own verdicts (an input isolated after failures, or rejected by the gate
    on its own) reach the hospital as an Event on its contribution, in its namespace; what the
    merger excluded is told with the merger's reason (_tell_contributions)."""
    before = old.get("excluded") or {}
    by_merger = {
        i.get("digest")
        for i in (o.outcome.result.get("inputs") or [] if o.outcome else [])
        if i.get("state") == InputState.EXCLUDED
    }
    me = f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"
    for c in o.contribs:
        digest = ((c.get("status") or {}).get("artifact") or {}).get("digest")
        code = (new.get("excluded") or {}).get(digest)
        if code is None or digest in before or digest in by_merger:
            continue
        why = {
            InputReason.ISOLATED_AFTER_FAILURES: (
                "every merge with it failed, alone too, while merges without it succeeded; "
                "it is not merged again (train a new contribution to try again)"
            ),
            InputReason.REJECTED_BY_GATE: (
                "the revision that added it regressed the composite's tasks significantly "
                "beyond the gate; "
                "it is not merged again"
            ),
        }.get(code)
        if why:
            event(c, "Warning", str(code), f"{me}: {why}")


def _tell_contributions(
    obj: Obj, pending: JSON, outcome: composite.Outcome, kube: KubeApi, event: EventFn
) -> None:
    """Each side learns who uses what: an accepted revision is recorded in the status of the
    contributions it newly includes; an input the merger excluded hears why in its own
    namespace (the forge's status keeps only the reason code)."""
    me = f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"
    for i, c in revision_outcome.new_inputs(pending, outcome.result, kube):
        if i.get("state", InputState.INCLUDED) == InputState.EXCLUDED:
            if not i.get("told"):  # else told at the hand-over to the sites
                message = revision_outcome.excluded_message(obj, pending, i)
                event(c, "Warning", EventReason.EXCLUDED_BY_MERGER, message)
        elif outcome.state == RevisionState.ACCEPTED:
            used = [u for u in (c["status"].get("usedBy") or []) if u.get("composite") != me]
            used = [{"composite": me, "revision": pending["revision"]}, *used]
            used = used[:USED_BY_LIMIT]
            meta = c["metadata"]
            kube.patch_status(CONTRIBUTIONS, meta["namespace"], meta["name"], {"usedBy": used})
