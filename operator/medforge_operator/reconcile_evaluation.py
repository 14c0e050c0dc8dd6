"""A candidate revision at the sites (side effects of a composite's round): the hand-over from
the merge (the summary gate passed), an evaluation Job per consenting EvaluationSet in its
hospital's namespace, the sites' results read from the store, and the decision (sites.decide),
told to each site in its own namespace. Nothing a site wrote is read but its result file, and
the operator applies the set's minSamples to it itself."""

from __future__ import annotations

import logging
from typing import Any

from kubernetes.client.exceptions import ApiException

from medforge_common.api import EventReason, RevisionState
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


def consenting_sets(
    obj: Obj, kube: KubeApi, s: Settings, cat: Catalog, tasks: set[str]
) -> list[JSON]:
    """The EvaluationSets that name this composite, for its tasks, in managed namespaces its
    contributions' namespace selector matches: a site receives the candidate's files, so only
    the consortium's own hospitals may be one."""
    ns_sel = (obj["spec"].get("contributions") or {}).get("namespaceSelector")
    found = [
        e
        for ns in (s.namespaces or (None,))
        for e in kube.iter_objects(EVALUATIONSETS, ns)
        if evaluation.consents(e, obj)
        and evaluation.applies(e, tasks)
        and cat.namespaces.managed(e["metadata"]["namespace"])
        and (
            not ns_sel
            or composite.selector_matches(
                ns_sel, cat.namespaces.labels(e["metadata"]["namespace"]) or {}
            )
        )
    ]
    return evaluation.one_per_task(found)


def _kept_result(result: JSON) -> JSON:
    """What settling needs of the merge's result, kept in pendingRevision while the sites score:
    the artifact, figures and inputs (codes only; the merger's words about an input went to its
    hospital)."""
    out = {k: result[k] for k in RESULT_KEYS if k in result}
    out["inputs"] = [
        {k: v for k, v in i.items() if k != "reason"}
        for i in result.get("inputs") or []
        if isinstance(i, dict)
    ]
    return out


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
    found = consenting_sets(obj, kube, s, cat, tasks)
    if not found:
        return  # no site: the gate behaves as before
    rule = sites.SiteRule.from_spec(obj["spec"].get("gate"))
    o.evaluating = {
        **pending,
        "evaluation": {
            "startedAt": at,
            "deadline": composite.later(at, rule.timeout),
            "message": out.message,
            "result": _kept_result(out.result),
            "sites": [evaluation.site_record(e) for e in found[: sites.SITES_SHOWN]],
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
    arrived, and decide when the gate can."""
    ev = dict(pending["evaluation"])
    revision = int(pending["revision"])
    try:
        base = cat.base_models.resolve(
            obj["spec"]["baseModel"]["name"], pending.get("baseDigest"), "spec.baseModel"
        )
    except BaseModelUnusable as exc:
        o.start_problem = (exc.reason, exc.message)
        o.evaluating = pending
        return
    try:
        ev["sites"] = [
            _site(obj, revision, ev, dict(site), kube, store, s, cat, base, at)
            for site in ev.get("sites") or []
        ]
    except StoreUnreachable as exc:
        o.outcome = composite.Outcome(R.STORE_UNREACHABLE, str(exc))
        o.evaluating = pending
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
    _tell_sites(obj, revision, ev, d, o, kube, at)
    if d.accepted or d.reason != sites.QUORUM_NOT_REACHED:
        return
    # Nobody blamed: these inputs wait for the next arrival to make a new candidate.
    o.outcome.awaiting = [str(x) for x in pending.get("digests") or []]


def _site(
    obj: Obj, revision: int, ev: JSON, site: JSON, kube: KubeApi, store: ForgeStore,
    s: Settings, cat: Catalog, base: Resolved, at: str,
) -> JSON:  # fmt: skip
    """A site's record after this round: its result once in the store, else its Job's."""
    if site.get("state") in sites.ANSWERED:
        return site
    ns, name = str(site["namespace"]), str(site["name"])
    es = kube.get_object(EVALUATIONSETS, ns, name)
    if (
        es is None
        or es["metadata"].get("uid") != site.get("uid")
        or not evaluation.consents(es, obj)
    ):
        return site | {
            "state": sites.FAILED,
            "message": "the set left (deleted or consent withdrawn)",
        }
    try:
        raw = store.read_json(
            signing.evaluation_prefix(store.bucket, obj, revision, es),
            {"name": EVALUATION_FILE},
            MAX_RESULT_BYTES,
            artifact=False,
        )
        return sites.report(site, raw, at)
    except ObjectMissing:
        pass
    except VerificationFailed:
        return site | {"state": sites.FAILED, "message": "its result file is not JSON"}
    return _follow_job(obj, revision, ev, site, es, kube, store, s, cat, base)


def _follow_job(
    obj: Obj, revision: int, ev: JSON, site: JSON, es: Obj, kube: KubeApi, store: ForgeStore,
    s: Settings, cat: Catalog, base: Resolved,
) -> JSON:  # fmt: skip
    """Start the site's Job, or follow it: a failed Job is the site's answer (Failed); a
    running one gets fresh URLs for the plan derived again from the composite and the set."""
    ns, name = es["metadata"]["namespace"], evaluation.job_name(es, obj, revision)
    job = kube.get_job(ns, name)
    if job is not None and job["metadata"].get("uid") != site.get("jobUid"):
        ours = jobs.made_by_us(job) and jobs.owned_by(job, es["metadata"]["uid"])
        if site.get("jobUid") or not ours:
            return site | {
                "state": sites.FAILED,
                "message": f"Job {name} is not the one made for it",
            }
        site["jobUid"] = job["metadata"]["uid"]  # ours, made in a round whose write was lost
    if job is None:
        if site.get("jobUid"):
            return site | {"state": sites.FAILED, "message": "its evaluation Job was deleted"}
        try:
            job, created = kube.create_job(evaluation.job(es, obj, revision, s, base))
        except (ApiException, ValueError, UriError) as exc:
            why = getattr(exc, "reason", None) or str(exc)
            return site | {"state": sites.FAILED, "message": f"no evaluation Job: {why}"}
        if not created and not jobs.owned_by(job, es["metadata"]["uid"]):
            return site | {
                "state": sites.FAILED,
                "message": f"Job {name} is not the one made for it",
            }
        site["jobUid"] = job["metadata"]["uid"]
    state = jobstatus.job_state(job)
    if state == "Failed":
        reason, message = jobstatus.job_failure(job)
        text = jobs.redact_urls(f"{reason}: {message}")[:300]
        return site | {"state": sites.FAILED, "message": text}
    if state == "Active" and not jobstatus.never_started(job):
        own = evaluation.own_contributions(kube.list_objects(CONTRIBUTIONS, ns), es, base.digest)
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


def _tell_sites(
    obj: Obj, revision: int, ev: JSON, d: sites.Decision, o: composite.Observation,
    kube: KubeApi, at: str,
) -> None:  # fmt: skip
    """Each set learns what its images said (status.scored), a regressed site with its figures
    (an Event in its namespace); Jobs still running are stopped."""
    verdict = RevisionState.ACCEPTED if d.accepted else f"{RevisionState.REJECTED}: {d.reason}"
    for site in ev.get("sites") or []:
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
        me = evaluation.key(obj)
        kept = [
            e
            for e in (es.get("status") or {}).get("scored") or []
            if not (e.get("composite") == me and e.get("revision") == revision)
        ]
        patch = {
            "scored": [entry, *kept][:SCORED_KEPT],
            "observedGeneration": es["metadata"].get("generation"),
        }
        kube.patch_status(EVALUATIONSETS, ns, name, patch)
        if site.get("overlap"):
            o.site_events.append(
                (
                    es,
                    "Warning",
                    EventReason.TRAINING_OVERLAP,
                    f"{site['overlap']} of this set's images have the name and size of images "
                    "this namespace's own contributions trained on: scores on them overstate "
                    "the model; keep held-out patients apart",
                )
            )
        if site["site"] in d.regressed:
            c, sv = site["candidate"], site.get("served") or {}
            served = ((obj.get("status") or {}).get("current") or {}).get("revision", "")
            o.site_events.append(
                (
                    es,
                    "Warning",
                    EventReason.SITE_REGRESSION,
                    f"{me} revision {revision} was rejected: on your {c.get('samples')} images "
                    f"its accuracy is {c.get('accuracy'):.3f} against {sv.get('accuracy', 0):.3f} "
                    f"for the served revision {served} (macro-F1 "
                    f"{c.get('f1', 0):.3f} vs {sv.get('f1', 0):.3f}); the new inputs that cause it "
                    "are found and excluded",
                )
            )


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
