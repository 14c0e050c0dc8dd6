"""One reconcile round of a CompositeModel: select inputs, finish or start a merge revision,
write the status computed by `composite`."""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from medforge_common.result import read_result
from medforge_common.uris import UriError
from medforge_operator import COMPOSITES, CONTRIBUTIONS, composite, jobs, names
from medforge_operator.conditions import now
from medforge_operator.contribution import status_changed
from medforge_operator.kube import Kube
from medforge_operator.metrics import JOBS_CREATED, REVISIONS
from medforge_operator.reconcile_contribution import base_model_files
from medforge_operator.settings import Settings
from medforge_operator.store import ForgeStore, StoreUnreachable, VerificationFailed, s3_uri

JSON = dict[str, Any]
EventFn = Callable[[JSON, str, str, str], None]
log = logging.getLogger("medforge.composite")
# One reconcile at a time per composite: events of the composite, of its Jobs and of
# contributions all lead here, from several worker threads.
_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)


def matching_contributions(obj: JSON, kube: Kube, s: Settings) -> list[JSON]:
    spec = obj["spec"].get("contributions") or {}
    selector = composite.selector_string(spec.get("selector"))
    ns_sel = spec.get("namespaceSelector")
    if s.namespaces:
        found = [c for ns in s.namespaces for c in kube.list_objects(CONTRIBUTIONS, ns, selector)]
    else:
        found = kube.list_objects(CONTRIBUTIONS, None, selector)
    if ns_sel:
        allowed = kube.namespaces(composite.selector_string(ns_sel))
        found = [c for c in found if c["metadata"]["namespace"] in allowed]
    return found


def reconcile(obj: JSON, kube: Kube, store: ForgeStore, s: Settings, event: EventFn) -> None:
    meta = obj["metadata"]
    with _locks[f"{meta['namespace']}/{meta['name']}"]:
        fresh = kube.get_object(COMPOSITES, meta["namespace"], meta["name"])
        if fresh is not None:
            _reconcile(fresh, kube, store, s, event)


def _reconcile(obj: JSON, kube: Kube, store: ForgeStore, s: Settings, event: EventFn) -> None:
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

    obj = {**obj, "status": status}
    contribs = matching_contributions(obj, kube, s)
    inputs, candidates = composite.evaluate_inputs(obj, contribs)
    plan = composite.plan_revision(obj, candidates, contribs) if not running else None
    if plan is not None and problem is None:
        try:
            started = _start(obj, plan, kube, store, s)
            status |= started
            extra |= started
            running = started["pendingRevision"]
            obj = {**obj, "status": status}
            inputs, _ = composite.evaluate_inputs(obj, contribs)
            event(
                obj,
                "Normal",
                "RevisionStarted",
                f"merging revision {plan.revision} with {len(plan.new)} new contribution(s)",
            )
        except StoreUnreachable as exc:
            problem = ("StoreUnreachable", f"{exc}; retrying")
        except (UriError, VerificationFailed) as exc:
            problem = ("InvalidSpec", str(exc))
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


def _start(obj: JSON, plan: composite.Plan, kube: Kube, store: ForgeStore, s: Settings) -> JSON:
    meta, spec = obj["metadata"], obj["spec"]
    current = (obj.get("status") or {}).get("current")
    out = composite.output_prefix(store.bucket, meta["namespace"], meta["name"], plan.revision)
    outputs = {f: store.presign_put(out.join(f)) for f in composite.OUTPUT_FILES}
    input_files = []
    for c in plan.all_inputs:
        art = c["status"]["artifact"]
        prefix = s3_uri(art["uri"], f"{composite.key(c)} status.artifact.uri")
        input_files.append(
            {
                "namespace": c["metadata"]["namespace"],
                "name": c["metadata"]["name"],
                "digest": art["digest"],
                "task": art.get("task"),
                "files": [
                    {"name": f, "url": store.presign_get(prefix.join(f))}
                    for f in [
                        "manifest.json",
                        *[f for f in art.get("files", []) if f != "manifest.json"],
                    ]
                ],
            }
        )
    current_files = None
    if current is not None:
        cprefix = s3_uri(current["uri"], "status.current.uri")
        current_files = [
            {"name": f, "url": store.presign_get(cprefix.join(f))}
            for f in [
                "manifest.json",
                *[f for f in current.get("files", []) if f != "manifest.json"],
            ]
        ]
    config = composite.merge_config(
        obj, plan, base_model_files(store, spec), input_files, current_files, outputs, out
    )
    kube.create_job(composite.merge_job(obj, plan, s, config))
    JOBS_CREATED.labels("merge").inc()
    return {
        "revision": plan.revision,
        "pendingRevision": {
            "revision": plan.revision,
            "digests": [c["status"]["artifact"]["digest"] for c in plan.new],
            "incremental": config["integration"] == "incremental",
            "startedAt": now(),
        },
    }


def _outcome(
    job: JSON, kube: Kube, store: ForgeStore, ns: str, job_name: str, uri: Any, spec: JSON
) -> composite.Outcome:
    pods = kube.job_pods(ns, job_name)
    summary = jobs.pod_summary(pods)
    if jobs.job_state(job) == "Failed":
        reason, message = jobs.job_failure(job)
        return composite.Outcome("Failed", f"{reason}: {summary['failure_message'] or message}")
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
    return composite.Outcome("Accepted" if ok else "Rejected", message, result)
