"""One reconcile round of a CompositeModel: select inputs, finish or start a merge revision,
write the status computed by `composite`."""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from kubernetes.client.exceptions import ApiException

from medforge_common.result import read_result
from medforge_common.uris import UriError
from medforge_operator import COMPOSITES, CONTRIBUTIONS, composite, jobs, names
from medforge_operator.basemodel import BaseModelUnusable, Resolved
from medforge_operator.catalog import Catalog
from medforge_operator.conditions import Cond, merge_conditions, now
from medforge_operator.contribution import status_changed
from medforge_operator.kube import Kube
from medforge_operator.metrics import JOBS_CREATED, REVISIONS
from medforge_operator.settings import Settings
from medforge_operator.store import ForgeStore, StoreUnreachable, VerificationFailed

JSON = dict[str, Any]
EventFn = Callable[[JSON, str, str, str], None]
log = logging.getLogger("medforge.composite")
# One reconcile at a time per composite: events of the composite, of its Jobs and of
# contributions all lead here, from several worker threads.
_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)


def matching_contributions(obj: JSON, kube: Kube, s: Settings, cat: Catalog) -> list[JSON]:
    """The contributions whose owners shared them with this composite, narrowed by its label
    and namespace selectors. Nothing else is ever read into its status or its merge Jobs."""
    meta = obj["metadata"]
    me = f"{meta['namespace']}/{meta['name']}"
    spec = obj["spec"].get("contributions") or {}
    selector = composite.selector_string(spec.get("selector"))
    ns_sel = spec.get("namespaceSelector")
    if s.namespaces:
        found = [c for ns in s.namespaces for c in kube.list_objects(CONTRIBUTIONS, ns, selector)]
    else:
        found = kube.list_objects(CONTRIBUTIONS, None, selector)
    found = [c for c in found if composite.shares_with(c, me)]
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
    obj: JSON, kube: Kube, store: ForgeStore, s: Settings, event: EventFn, cat: Catalog
) -> None:
    meta = obj["metadata"]
    with _locks[f"{meta['namespace']}/{meta['name']}"]:
        fresh = kube.get_object(COMPOSITES, meta["namespace"], meta["name"])
        if fresh is None:
            return
        refusal = _refusal(fresh, s, cat)
        if refusal is not None:
            _stall(fresh, kube, *refusal)
        else:
            _reconcile(fresh, kube, store, s, event, cat)


def _refusal(obj: JSON, s: Settings, cat: Catalog) -> tuple[str, str] | None:
    """Why this composite may not merge anything where it is, if it may not."""
    ns = obj["metadata"]["namespace"]
    if ns not in s.forge_namespaces:
        return (
            "NotAForgeNamespace",
            f"namespace {ns} is not a forge namespace: CompositeModels are reconciled only in "
            "the namespaces of the operator's MEDFORGE_FORGE_NAMESPACES setting (chart value "
            "forgeNamespaces)",
        )
    if not cat.namespaces.managed(ns):
        return ("NamespaceNotManaged", cat.namespaces.not_managed_message(ns))
    return None


def _stall(obj: JSON, kube: Kube, reason: str, message: str) -> None:
    """Status of a composite the operator refuses to serve: no inputs, no Jobs."""
    gen = int(obj["metadata"]["generation"])
    old = obj.get("status") or {}
    conds = [
        Cond("Ready", False, reason, message),
        Cond("Reconciling", False, reason, ""),
        Cond("Stalled", True, reason, message),
    ]
    new = {
        "observedGeneration": gen,
        "phase": "Failed",
        "conditions": merge_conditions(old.get("conditions"), conds, gen),
    }
    if status_changed(old, new):
        patch = dict(new)
        for k in set(old) - set(new) - {"kopf"}:
            patch[k] = None
        kube.patch_status(COMPOSITES, obj["metadata"]["namespace"], obj["metadata"]["name"], patch)


def _reconcile(
    obj: JSON, kube: Kube, store: ForgeStore, s: Settings, event: EventFn, cat: Catalog
) -> None:
    meta, spec = obj["metadata"], obj["spec"]
    ns, name, gen = meta["namespace"], meta["name"], int(meta["generation"])
    old = obj.get("status") or {}
    status = dict(old)
    # Exclusions are kept per adapter digest: a retrained contribution (a new digest) gets a new
    # chance, a pause or a gate edit does not re-run a rejected adapter.
    problem: tuple[str, str] | None = None
    running: JSON | None = None
    extra: JSON = {}

    pending = status.get("pendingRevision")
    if pending:
        job_name = names.merge_job_name(name, pending["revision"])
        job = kube.get_job(ns, job_name)
        state = jobs.job_state(job)
        if state in ("Active", "Missing") and job is not None:
            running = pending
            if not jobs.never_started(job):
                cat.configs.ensure(job)  # fresh URLs for pods about to start
        elif state == "Missing":
            # Lost before it ran (deleted by hand): start that revision over.
            status.pop("pendingRevision")
            extra["pendingRevision"] = None
        else:
            uri = composite.output_prefix(store.bucket, ns, name, pending["revision"])
            outcome = _outcome(job or {}, kube, store, ns, job_name, uri, spec)
            if outcome.state == "StoreUnreachable":
                problem = ("StoreUnreachable", outcome.message)
                running = pending
            else:
                cat.configs.forget(job)
                REVISIONS.labels(outcome.state.lower()).inc()
                done = composite.finish_revision(
                    status,
                    pending,
                    outcome,
                    str(uri),
                    job_name,
                    int(spec.get("historyLimit", 10)),
                    now(),
                )
                status |= done
                extra |= done
                status.pop("pendingRevision")
                extra["pendingRevision"] = None
                kind = "Normal" if outcome.state == "Accepted" else "Warning"
                event(
                    obj,
                    kind,
                    f"Revision{outcome.state}",
                    f"revision {pending['revision']}: {outcome.message}",
                )
                _tell_contributions(obj, pending, outcome, kube, event)

    obj = {**obj, "status": status}
    base: Resolved | None = None
    try:
        base = cat.base_models.resolve(spec["baseModel"]["name"], None, "spec.baseModel")
    except BaseModelUnusable as exc:
        problem = problem or (exc.reason, exc.message)
    contribs = matching_contributions(obj, kube, s, cat)
    inputs, candidates = composite.evaluate_inputs(obj, contribs, base.digest if base else None)
    plan = composite.plan_revision(obj, candidates, contribs) if not running else None
    if plan is not None and problem is None and base is not None:
        try:
            started = _start(obj, plan, kube, store, s, cat, base)
            status |= started
            extra |= started
            running = started["pendingRevision"]
            obj = {**obj, "status": status}
            inputs, _ = composite.evaluate_inputs(obj, contribs, base.digest)
            event(
                obj,
                "Normal",
                "RevisionStarted",
                f"merging revision {plan.revision} with {len(plan.new)} new contribution(s)",
            )
        except (UriError, ValueError) as exc:
            problem = ("InvalidSpec", str(exc))
        except ApiException as exc:
            if exc.status not in (400, 403, 422):
                raise
            problem = ("InvalidSpec", f"the API server refused the merge Job: {exc.reason}")
    if (
        problem is None
        and (status.get("history") or [{}])[0].get("state") == "Failed"
        and not running
    ):
        last = status["history"][0]
        problem = ("MergeFailed", f"revision {last['revision']}: {last.get('message', '')}")
    phase, conds = composite.conditions_for(status, gen, bool(spec.get("paused")), running, problem)
    new = composite.build_status(old, gen, inputs, phase, conds, extra)
    if status_changed(old, new):
        patch = dict(new)
        for k in set(old) - set(new) - {"kopf"}:
            patch[k] = None
        kube.patch_status(COMPOSITES, ns, name, patch)


def _start(
    obj: JSON,
    plan: composite.Plan,
    kube: Kube,
    store: ForgeStore,
    s: Settings,
    cat: Catalog,
    base: Resolved,
) -> JSON:
    meta = obj["metadata"]
    out = composite.output_prefix(store.bucket, meta["namespace"], meta["name"], plan.revision)
    job_plan = composite.merge_plan(obj, plan, base, out, store.bucket)
    job = kube.create_job(composite.merge_job(obj, plan, s, job_plan))
    if jobs.job_state(job) == "Active" and not jobs.never_started(job):
        cat.configs.ensure(job)
    JOBS_CREATED.labels("merge").inc()
    return {
        "revision": plan.revision,
        "pendingRevision": {
            "revision": plan.revision,
            "digests": [c["status"]["artifact"]["digest"] for c in plan.new],
            "incremental": job_plan["integration"] == "incremental",
            "startedAt": now(),
        },
    }


# How many composites a contribution lists in status.usedBy.
USED_BY_LIMIT = 50


def _tell_contributions(
    obj: JSON, pending: JSON, outcome: composite.Outcome, kube: Kube, event: EventFn
) -> None:
    """Each side learns who uses what: an accepted revision is recorded in the status of the
    contributions it newly includes; an input the merger excluded hears why in its own
    namespace (the forge's status keeps only the reason code)."""
    me = f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"
    new = set(pending.get("digests") or [])
    for i in outcome.result.get("inputs") or []:
        ns, name, digest = i.get("namespace"), i.get("name"), i.get("digest")
        if not (ns and name and digest in new):
            continue
        c = kube.get_object(CONTRIBUTIONS, str(ns), str(name))
        if c is None or (c.get("status") or {}).get("artifact", {}).get("digest") != digest:
            continue
        if i.get("state", "Included") == "Excluded":
            event(
                c,
                "Warning",
                "ExcludedByMerger",
                f"{me} revision {pending['revision']}: {i.get('reason', '')}",
            )
        elif outcome.state == "Accepted":
            used = [u for u in (c["status"].get("usedBy") or []) if u.get("composite") != me]
            used = [{"composite": me, "revision": pending["revision"]}, *used][:USED_BY_LIMIT]
            kube.patch_status(CONTRIBUTIONS, str(ns), str(name), {"usedBy": used})


def _outcome(
    job: JSON, kube: Kube, store: ForgeStore, ns: str, job_name: str, uri: Any, spec: JSON
) -> composite.Outcome:
    pods = kube.job_pods(ns, job_name)
    summary = jobs.pod_summary(pods)
    if jobs.job_state(job) == "Failed":
        reason, message = jobs.job_failure(job)
        detail = jobs.redact_urls(str(summary["failure_message"] or message))
        return composite.Outcome("Failed", f"{reason}: {detail}")
    result = read_result(summary["success_message"] or "")
    if not result or "artifact" not in result:
        return composite.Outcome("Failed", "the merge Job wrote no result JSON")
    try:
        manifest = store.verify_artifact(uri, str(result["artifact"].get("digest", "")))
    except StoreUnreachable as exc:
        return composite.Outcome("StoreUnreachable", str(exc))
    except VerificationFailed as exc:
        return composite.Outcome("Failed", f"DigestMismatch: {exc}")
    result["artifact"]["files"] = [f.name for f in manifest.files]
    ok, message = composite.gate(result, float((spec.get("gate") or {}).get("maxRegression", 0.05)))
    message = jobs.redact_urls(message)
    return composite.Outcome("Accepted" if ok else "Rejected", message, result)
