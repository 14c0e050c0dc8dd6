"""EvaluationSet: a hospital's private held-out images, scored in its own namespace against each
candidate revision of the composites it names (pure builders: which sets consent, the site
records, the evaluation Job, its plan and its grant; reconcile_evaluation does the I/O)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

from medforge_common.artifacts import (
    ADAPTER_FILE,
    FINGERPRINTS_FILE,
    HEAD_FILE,
    MIXTURE_FILE,
)
from medforge_operator import basemodel, datajob, jobs, names, signing
from medforge_operator.bodies import Obj
from medforge_operator.composite import sites
from medforge_operator.composite.inputs import ready_for
from medforge_operator.composite.mergejob import artifact_refs, verified_prefix
from medforge_operator.contribution import has_verified_copy
from medforge_operator.datajob import dataset_wiring
from medforge_operator.settings import Settings

JSON = dict[str, Any]
MODEL_FILES = (ADAPTER_FILE, MIXTURE_FILE)
OWN_SHOWN = 20  # own training sets whose fingerprints an evaluation compares with


def key(composite: Obj) -> str:
    meta = composite["metadata"]
    return f"{meta['namespace']}/{meta['name']}"


def site_code(evaluation_set: Obj) -> str:
    meta = evaluation_set["metadata"]
    return f"{meta['namespace']}/{meta['name']}"


def consents(evaluation_set: Obj, composite: Obj) -> bool:
    """The set names this composite in spec.forges (its owner's consent, as for contributions)."""
    forges = (evaluation_set.get("spec") or {}).get("forges") or []
    return key(composite) in [str(f) for f in forges]


def applies(evaluation_set: Obj, tasks: set[str]) -> bool:
    """A set scores a candidate that knows its task (any, when the revision carries no tasks)."""
    task = ((evaluation_set.get("spec") or {}).get("task") or {}).get("name")
    return not tasks or task in tasks


def one_per_task(sets: Iterable[JSON]) -> list[JSON]:
    """A hospital's oldest set per task, by site code: a namespace that declares many sets
    for one task cannot crowd the others out of the SITES_SHOWN kept (read as a stream: what
    is held is one set per hospital and task)."""
    oldest: dict[tuple[str, str], JSON] = {}

    def age(e: JSON) -> tuple[str, str]:
        return str(e["metadata"].get("creationTimestamp", "")), site_code(e)

    for e in sets:
        task = str(((e.get("spec") or {}).get("task") or {}).get("name"))
        k = (e["metadata"]["namespace"], task)
        if k not in oldest or age(e) < age(oldest[k]):
            oldest[k] = e
    return sorted(oldest.values(), key=site_code)


def site_record(evaluation_set: Obj) -> JSON:
    spec, meta = evaluation_set["spec"], evaluation_set["metadata"]
    return {
        "site": site_code(evaluation_set),
        "namespace": meta["namespace"],
        "name": meta["name"],
        "uid": meta["uid"],
        "task": spec["task"]["name"],
        "minSamples": int(spec.get("minSamples", sites.DEFAULT_MIN_SAMPLES)),
        "state": sites.PENDING,
    }


def job_name(evaluation_set: Obj, composite: Obj, revision: int) -> str:
    """One Job per set, composite and candidate; the composite's uid keeps an older object of
    the same name from matching."""
    h = hashlib.sha256(f"{key(composite)}/{composite['metadata']['uid']}".encode()).hexdigest()
    return names.child_name(evaluation_set["metadata"]["name"], f"eval-{h[:6]}-r{revision}")


def own_contributions(
    contribs: Iterable[JSON], evaluation_set: Obj, base_digest: str
) -> list[JSON]:
    """The hospital's own Ready contributions (the set's namespace only) for the base model,
    the first OWN_SHOWN by name: their heads and training fingerprints are the only
    contribution files a site receives (read as a stream, at most 2 x OWN_SHOWN held)."""
    ns = evaluation_set["metadata"]["namespace"]
    own: list[JSON] = []
    for c in contribs:
        if c["metadata"]["namespace"] == ns and ready_for(c, base_digest) and has_verified_copy(c):
            own.append(c)
            if len(own) > 2 * OWN_SHOWN:
                own = sorted(own, key=lambda x: x["metadata"]["name"])[:OWN_SHOWN]
    return sorted(own, key=lambda c: c["metadata"]["name"])[:OWN_SHOWN]


def own_head(own: list[JSON], evaluation_set: Obj) -> JSON | None:
    """The contribution whose linear head scores the set: same task name and classes."""
    task = evaluation_set["spec"]["task"]
    for c in own:
        t = (c.get("spec") or {}).get("task") or {}
        files = c["status"]["artifact"].get("files") or []
        if (
            t.get("name") == task["name"]
            and list(t.get("classes") or []) == list(task.get("classes") or [])
            and HEAD_FILE in files
        ):
            return c
    return None


def _contribution_ref(bucket: str, c: JSON, wanted: str) -> JSON:
    art, meta = c["status"]["artifact"], c["metadata"]
    prefix = signing.verified_contribution(
        bucket, meta["namespace"], meta["name"], meta["uid"], str(art["digest"])
    )
    return {"digest": art["digest"], "files": artifact_refs(prefix, [wanted])}


def _revision_ref(
    bucket: str, composite: Obj, revision: int, digest: str, files: list[str]
) -> JSON:
    prefix = verified_prefix(bucket, composite, revision)
    return {
        "revision": revision,
        "digest": digest,
        "files": artifact_refs(prefix, [f for f in files if f in MODEL_FILES]),
    }


def plan(
    evaluation_set: Obj,
    composite: Obj,
    revision: int,
    candidate: JSON,
    base: basemodel.Resolved,
    own: list[JSON],
    bucket: str,
) -> JSON:
    """The evaluation Job's config with store URIs in place of URLs (signed inside
    `grant`): `candidate` is the verified artifact {digest, files} of the revision scored."""
    spec = evaluation_set["spec"]
    dataset, _, _, _ = dataset_wiring(spec)
    task = spec["task"]
    current = (composite.get("status") or {}).get("current") or {}
    head = own_head(own, evaluation_set) if task.get("head") == "linear" else None
    out: JSON = {
        "kind": "evaluate",
        "composite": key(composite),
        "task": {
            "name": task["name"],
            "classes": list(task["classes"]),
            "head": task.get("head", "clip-prompt"),
        },
        "minSamples": int(spec.get("minSamples", sites.DEFAULT_MIN_SAMPLES)),
        "dataset": dataset,
        "baseModel": {"name": base.name, "digest": base.digest, "files": base.file_refs()},
        "candidate": _revision_ref(
            bucket, composite, revision, candidate["digest"], candidate.get("files") or []
        ),
        "served": None,
        "head": _contribution_ref(bucket, head, HEAD_FILE) if head else None,
        "fingerprints": [
            _contribution_ref(bucket, c, FINGERPRINTS_FILE)
            for c in own
            if FINGERPRINTS_FILE in (c["status"]["artifact"].get("files") or [])
        ],
        "output": {
            "result": jobs.put_ref(
                signing.evaluation_result(bucket, composite, revision, evaluation_set)
            )
        },
    }
    if current.get("revision") is not None and current.get("digest"):
        out["served"] = _revision_ref(
            bucket,
            composite,
            int(current["revision"]),
            str(current["digest"]),
            list(current.get("files") or []),
        )
    return out


def grant(
    evaluation_set: Obj,
    composite: Obj,
    revision: int,
    candidate_files: list[str],
    base: basemodel.Resolved,
    own: list[JSON],
    bucket: str,
) -> signing.Grant:
    """What the evaluation Job may reach, built from the composite's own status, its verified
    BaseModel and the hospital's own contributions, independently of `plan`."""
    current = (composite.get("status") or {}).get("current") or {}
    revisions: list[tuple[int, list[str]]] = [(revision, candidate_files)]
    if current.get("revision") is not None:
        revisions.append((int(current["revision"]), list(current.get("files") or [])))
    return signing.evaluation_grant(
        bucket, composite, revisions, base.uri, base.files, own, evaluation_set, revision
    )


def job(
    evaluation_set: Obj, composite: Obj, revision: int, s: Settings, base: basemodel.Resolved
) -> JSON:
    """The evaluation Job, in the set's namespace, owned by the set: restricted pod, the
    hospital's own dataset credentials or PVC, the trainer's image."""
    return datajob.data_job(
        evaluation_set,
        job_name(evaluation_set, composite, revision),
        "evaluate",
        list(s.evaluator_command),
        s,
        base,
        labels={jobs.LABEL_REVISION: str(revision)},
        backoff_limit=1,
        active_deadline=int(evaluation_set["spec"].get("activeDeadlineSeconds") or 3600),
        annotations={ANNOTATION_COMPOSITE: key(composite)},
    )


ANNOTATION_COMPOSITE = "medforge.io/composite"  # for people reading the Job only


def scored_entry(composite: Obj, revision: int, site: JSON, verdict: str, at: str) -> JSON:
    """One line of the set's status.scored: what the hospital's own images said."""
    out: JSON = {
        "composite": key(composite),
        "revision": revision,
        "state": site.get("state"),
        "verdict": verdict,
        "at": at,
    }
    for k in ("candidate", "served", "overlap", "message"):
        if site.get(k) is not None:
            out[k] = site[k]
    return out
