"""A candidate revision at the sites (side effects of a composite's round): the hand-over from
the merge (the summary gate passed), an evaluation Job per consenting EvaluationSet in its
hospital's namespace, the sites' results read from the store, and the decision (sites.decide),
told to each site in its own namespace. Nothing a site wrote is read but its result file, and
the operator applies the set's minSamples to it itself."""

from __future__ import annotations

import logging
from typing import Any

from kubernetes.client.exceptions import ApiException

from medforge_common.api import EventReason, InputState, RevisionState
from medforge_common.api import Reason as R
from medforge_common.artifacts import EVALUATION_FILE
from medforge_common.uris import UriError
from medforge_operator import (
    CONTRIBUTIONS,
    EVALUATIONSETS,
    composite,
    evaluation,
    jobs,
    jobstatus,
    names,
    revision_outcome,
    signing,
)
from medforge_operator.basemodel import BaseModelUnusable, Resolved
from medforge_operator.bodies import Obj
from medforge_operator.catalog import Catalog, ConfigRefused
from medforge_operator.composite import sites
from medforge_operator.kubeapi import KubeApi
from medforge_operator.settings import Settings
from medforge_operator.store import ForgeStore, ObjectMissing, StoreUnreachable, VerificationFailed

JSON = dict[str, Any]
log = logging.getLogger("medforge.evaluation")
MAX_RESULT_BYTES = 64 * 1024
SCORED_KEPT = 20  # status.scored of a set: the newest candidates it scored
RESULT_KEYS = ("artifact", "metrics", "score", "integration", "merge")


def is_site(e: JSON, obj: Obj, cat: Catalog, tasks: set[str] | None = None) -> bool:
    """A set that names this composite (for one of its tasks), in a managed namespace that
    the composite's contributions' namespace selector matches: a site receives the candidate's
    files, so only the consortium's own hospitals may be one."""
    ns = e["metadata"]["namespace"]
    ns_sel = (obj["spec"].get("contributions") or {}).get("namespaceSelector")
    return (
        evaluation.consents(e, obj)
        and (tasks is None or evaluation.applies(e, tasks))
        and cat.namespaces.managed(ns)
        and (not ns_sel or composite.selector_matches(ns_sel, cat.namespaces.labels(ns) or {}))
    )


def consenting_sets(
    obj: Obj, kube: KubeApi, s: Settings, cat: Catalog, tasks: set[str]
) -> list[JSON]:
    """The sites of a candidate: each hospital's oldest set per task (read a page at a time)."""
    found = (
        e
        for ns in (s.namespaces or (None,))
        for e in kube.iter_objects(EVALUATIONSETS, ns)
        if is_site(e, obj, cat, tasks)
    )
    return evaluation.one_per_task(found)


def _kept_result(result: JSON) -> JSON:
    """What settling needs of the merge's result, kept in pendingRevision while the sites score:
    the artifact, figures and inputs (codes only: the merger's words about an input went to its
    hospital at the hand-over)."""
    out = {k: result[k] for k in RESULT_KEYS if k in result}
    out["inputs"] = [
        {k: v for k, v in i.items() if k != "reason"} | {"told": True}
        if i.get("state") == InputState.EXCLUDED
        else dict(i)
        for i in result.get("inputs") or []
        if isinstance(i, dict)
    ]
    return out


def _tell_excluded(
    obj: Obj, pending: JSON, result: JSON, o: composite.Observation, kube: KubeApi
) -> None:
    """The merger's reasons for excluding new inputs reach their hospitals now, while the
    result still holds them (the forge's status keeps codes only)."""
    for i, c in revision_outcome.new_inputs(pending, result, kube):
        if i.get("state") == InputState.EXCLUDED:
            why = revision_outcome.excluded_message(obj, pending, i)
            o.site_events.append((c, "Warning", EventReason.EXCLUDED_BY_MERGER, why))


def hand_over(
    obj: Obj, pending: JSON, o: composite.Observation, kube: KubeApi, store: ForgeStore,
    s: Settings, cat: Catalog, at: str,
) -> None:  # fmt: skip
    """The summary gate accepted the merge: when sites consent, the candidate goes to them
    (Evaluating) instead of being served."""
    out = o.outcome
    if out is None or out.state != RevisionState.ACCEPTED:
        return
    tasks = {str(t) for t in (out.result.get("metrics") or {})}
    found = consenting_sets(obj, kube, s, cat, tasks)[: sites.SITES_SHOWN]
    if not found:
        return  # no site: the gate behaves as before
    rule = sites.SiteRule.from_spec(obj["spec"].get("gate"))
    _tell_excluded(obj, pending, out.result, o, kube)
    cat.configs.forget(o.job)  # the merge Job is done with its URLs
    o.evaluating = {
        **pending,
        "evaluation": {
            "startedAt": at,
            "deadline": composite.later(at, rule.timeout),
            "message": out.message,
            "result": _kept_result(out.result),
            "sites": [evaluation.site_record(e) for e in found],
        },
    }
    o.outcome = None
    o.site_events.append(
        (
            obj,
            "Normal",
            EventReason.REVISION_EVALUATING,
            f"revision {pending['revision']} passed the summary gate: {len(found)} site(s) score "
            "it on their own images",
        )
    )
    advance(obj, o.evaluating, o, kube, store, s, cat, at)


def advance(
    obj: Obj, pending: JSON, o: composite.Observation, kube: KubeApi, store: ForgeStore,
    s: Settings, cat: Catalog, at: str,
) -> None:  # fmt: skip
    """One round of a candidate at its sites: start or follow each site's Job, read what
    arrived, and decide when the gate can. A site's trouble stays that site's; a store that
    does not answer postpones the decision (a fault is retried, never a verdict)."""
    ev = dict(pending["evaluation"])
    revision = int(pending["revision"])
    try:
        base: Resolved | None = cat.base_models.resolve(
            obj["spec"]["baseModel"]["name"], pending.get("baseDigest"), "spec.baseModel"
        )
    except BaseModelUnusable:
        base = None  # no new Job or URL meanwhile; what arrives is still read and decided
    kept, fault = [], None
    for site in ev.get("sites") or []:
        try:
            now = _site(obj, revision, ev, dict(site), kube, store, s, cat, base, at)
        except StoreUnreachable as exc:
            fault, now = exc, site
        except (UriError, ValueError) as exc:
            now = site | {"state": sites.FAILED, "message": f"its spec: {exc}"[:300]}
        if now is not None:
            kept.append(now)
    ev["sites"] = kept
    if fault is not None:
        o.outcome = composite.Outcome(R.STORE_UNREACHABLE, str(fault))
        o.evaluating = {**pending, "evaluation": ev}
        return
    rule = sites.SiteRule.from_spec(obj["spec"].get("gate"))
    d = sites.decide(ev, rule, at)
    if not d.done:
        o.evaluating = {**pending, "evaluation": ev}
        return
    o.evaluating = None
    state = RevisionState.ACCEPTED if d.accepted else RevisionState.REJECTED
    msg = f"{ev.get('message', '')}; sites: {d.message}" if d.accepted else d.message
    o.outcome = composite.Outcome(state, msg, dict(ev.get("result") or {}), reason=d.reason)
    o.outcome.uri = str(composite.verified_prefix(store.bucket, obj, revision))
    o.outcome.job_name = names.merge_job_name(obj["metadata"]["name"], revision)
    o.outcome.sites = sites.settled_sites(ev)
    _tell_sites(obj, revision, ev, d, o, kube, cat, at)
    if not d.accepted and d.reason == R.QUORUM_NOT_REACHED:
        # Nobody blamed: these inputs wait for the next arrival to make a new candidate.
        o.outcome.awaiting = [str(x) for x in pending.get("digests") or []]


def _site(
    obj: Obj, revision: int, ev: JSON, site: JSON, kube: KubeApi, store: ForgeStore,
    s: Settings, cat: Catalog, base: Resolved | None, at: str,
) -> JSON | None:  # fmt: skip
    """A site's record after this round: its result once in the store, else its Job's; None
    when the set left (deleted, consent withdrawn, no longer selected): it no longer counts."""
    if site.get("state") in sites.ANSWERED:
        return site
    ns, name = str(site["namespace"]), str(site["name"])
    es = kube.get_object(EVALUATIONSETS, ns, name)
    if es is None or es["metadata"].get("uid") != site.get("uid") or not is_site(es, obj, cat):
        return None
    try:
        raw = store.read_json(
            signing.evaluation_prefix(store.bucket, obj, revision, es),
            {"name": EVALUATION_FILE},
            MAX_RESULT_BYTES,
            artifact=False,
        )
    except ObjectMissing:
        return _follow_job(obj, revision, ev, site, es, kube, store, s, cat, base)
    except VerificationFailed:
        return site | {"state": sites.FAILED, "message": "its result file is not JSON"}
    full = sites.report(site, raw, at)
    # The set's own status gets every figure (per-class recall too) at once; the forge's
    # status keeps the headline figures only.
    _record(es, evaluation.scored_entry(obj, revision, full, "Pending", at), obj, revision, kube)
    return sites.compact(full)


def _follow_job(
    obj: Obj, revision: int, ev: JSON, site: JSON, es: Obj, kube: KubeApi, store: ForgeStore,
    s: Settings, cat: Catalog, base: Resolved | None,
) -> JSON:  # fmt: skip
    """Start the site's Job, or follow it: a failed Job is the site's answer (Failed); a
    running one gets fresh URLs for the plan derived again from the composite and the set."""
    ns, name = es["metadata"]["namespace"], evaluation.job_name(es, obj, revision)
    job = kube.get_job(ns, name)
    foreign = {"state": sites.FAILED, "message": f"Job {name} is not the one made for it"}
    if job is not None and job["metadata"].get("uid") != site.get("jobUid"):
        if site.get("jobUid") or not jobs.owned_by(job, es["metadata"]["uid"]):
            return site | foreign
        site["jobUid"] = job["metadata"]["uid"]  # ours, made in a round whose write was lost
    if job is None:
        if site.get("jobUid"):
            return site | {"state": sites.FAILED, "message": "its evaluation Job was deleted"}
        if base is None:
            return site  # the base model is not usable now: no Job, no URL
        try:
            job, created = kube.create_job(evaluation.job(es, obj, revision, s, base))
        except ApiException as exc:
            if exc.status not in (400, 403, 409, 422):
                raise
            return site | {"state": sites.FAILED, "message": f"no evaluation Job: {exc.reason}"}
        if not created and not jobs.owned_by(job, es["metadata"]["uid"]):
            return site | foreign
        site["jobUid"] = job["metadata"]["uid"]
    state = jobstatus.job_state(job)
    if state == "Failed":
        reason, message = jobstatus.job_failure(job)
        text = jobs.redact_urls(f"{reason}: {message}")[:300]
        return site | {"state": sites.FAILED, "message": text}
    if state == "Active" and base is not None and not jobstatus.never_started(job):
        contribs = kube.iter_objects(CONTRIBUTIONS, ns)
        own = evaluation.own_contributions(contribs, es, base.digest)
        cand = (ev.get("result") or {}).get("artifact") or {}
        files = list(cand.get("files") or [])
        try:
            plan = evaluation.plan(es, obj, revision, cand, base, own, store.bucket)
            grant = evaluation.grant(es, obj, revision, files, base, own, store.bucket)
            cat.configs.ensure(job, plan, grant, s.presign_expiry_seconds)
        except (signing.SigningRefused, ConfigRefused) as exc:
            log.warning("%s: %s", evaluation.site_code(es), exc)
            return site | {"state": sites.FAILED, "message": str(exc)[:300]}
    return site


def _record(es: Obj, entry: JSON, obj: Obj, revision: int, kube: KubeApi) -> None:
    """The set's status.scored with this candidate's entry (merged into the one it has)."""
    me = evaluation.key(obj)
    scored = [e for e in (es.get("status") or {}).get("scored") or [] if isinstance(e, dict)]
    mine = next(
        (e for e in scored if e.get("composite") == me and e.get("revision") == revision), {}
    )
    rest = [e for e in scored if e is not mine]
    patch = {
        "scored": [mine | entry, *rest][:SCORED_KEPT],
        "observedGeneration": es["metadata"].get("generation"),
    }
    kube.patch_status(EVALUATIONSETS, es["metadata"]["namespace"], es["metadata"]["name"], patch)


def _tell_sites(
    obj: Obj, revision: int, ev: JSON, d: sites.Decision, o: composite.Observation,
    kube: KubeApi, cat: Catalog, at: str,
) -> None:  # fmt: skip
    """Each set learns the verdict (status.scored), a regressed site with its figures (an Event
    in its namespace); Jobs still running are stopped, and every Job's URLs forgotten."""
    verdict = RevisionState.ACCEPTED if d.accepted else f"{RevisionState.REJECTED}: {d.reason}"
    for site in ev.get("sites") or []:
        if site.get("jobUid"):
            cat.configs.forget({"metadata": {"uid": site["jobUid"]}})
        ns, name = str(site["namespace"]), str(site["name"])
        es = kube.get_object(EVALUATIONSETS, ns, name)
        if es is None or es["metadata"].get("uid") != site.get("uid"):
            continue
        if site.get("state") not in sites.ANSWERED:
            site = site | {"state": sites.NOT_REPORTED}
            job = kube.get_job(ns, evaluation.job_name(es, obj, revision))
            if job is not None and job["metadata"].get("uid") == site.get("jobUid"):
                kube.delete_job(ns, job["metadata"]["name"])
        entry = evaluation.scored_entry(obj, revision, site, verdict, at)
        if site.get("state") == sites.REPORTED:  # its full figures are there already
            entry = {k: v for k, v in entry.items() if k not in ("candidate", "served")}
        _record(es, entry, obj, revision, kube)
        for event in _site_events(obj, revision, site, d, es):
            o.site_events.append(event)


def _site_events(
    obj: Obj, revision: int, site: JSON, d: sites.Decision, es: Obj
) -> list[tuple[Obj, str, str, str]]:
    out: list[tuple[Obj, str, str, str]] = []
    if site.get("overlap"):
        out.append(
            (
                es,
                "Warning",
                EventReason.TRAINING_OVERLAP,
                f"{site['overlap']} of this set's images have the name and size of images this "
                "namespace's own contributions trained on: scores on them overstate the model; "
                "keep held-out patients apart",
            )
        )
    if site["site"] in d.regressed:
        c, sv = site["candidate"], site.get("served") or {}
        served = ((obj.get("status") or {}).get("current") or {}).get("revision", "")
        out.append(
            (
                es,
                "Warning",
                EventReason.SITE_REGRESSION,
                f"{evaluation.key(obj)} revision {revision} was rejected: on your "
                f"{c.get('samples')} images its accuracy is {c.get('accuracy'):.3f} against "
                f"{sv.get('accuracy', 0):.3f} for the served revision {served} (macro-F1 "
                f"{c.get('f1', 0):.3f} vs {sv.get('f1', 0):.3f}); the new inputs that cause it "
                "are found and excluded",
            )
        )
    return out


def stop(obj: Obj, pending: JSON, kube: KubeApi) -> None:
    """A withdrawal cancelled the candidate: its sites' Jobs still running are stopped."""
    revision = int(pending["revision"])
    for site in (pending.get("evaluation") or {}).get("sites") or []:
        if site.get("state") in sites.ANSWERED or not site.get("jobUid"):
            continue
        es = kube.get_object(EVALUATIONSETS, str(site["namespace"]), str(site["name"]))
        if es is None:
            continue
        job = kube.get_job(str(site["namespace"]), evaluation.job_name(es, obj, revision))
        if job is not None and job["metadata"].get("uid") == site["jobUid"]:
            kube.delete_job(str(site["namespace"]), job["metadata"]["name"])
