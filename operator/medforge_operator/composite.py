"""CompositeModel: which contributions count, when a revision starts, the merge Job, the gate
and the status (pure functions)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from medforge_common.uris import S3Uri
from medforge_operator import basemodel, jobs, names
from medforge_operator.conditions import Cond, is_true, merge_conditions
from medforge_operator.settings import Settings

JSON = dict[str, Any]
OUTPUT_FILES = (
    "adapter.safetensors",
    "manifest.json",
    "mixture.safetensors",
    "tasks.safetensors",
)


def selector_string(sel: JSON | None) -> str:
    """A metav1.LabelSelector as the API's label_selector query string."""
    if not sel:
        return ""
    parts = [f"{k}={v}" for k, v in sorted((sel.get("matchLabels") or {}).items())]
    for e in sel.get("matchExpressions") or []:
        op, key, values = e["operator"], e["key"], ",".join(e.get("values") or [])
        parts.append(
            {
                "In": f"{key} in ({values})",
                "NotIn": f"{key} notin ({values})",
                "Exists": key,
                "DoesNotExist": f"!{key}",
            }[op]
        )
    return ",".join(parts)


def selector_matches(sel: JSON | None, labels: dict[str, str]) -> bool:
    """Whether labels satisfy a metav1.LabelSelector (evaluated here, so that namespace
    selectors need only `get` on single namespaces, never `list`)."""
    if not sel:
        return True
    if any(labels.get(k) != v for k, v in (sel.get("matchLabels") or {}).items()):
        return False
    for e in sel.get("matchExpressions") or []:
        op, k, values = e["operator"], e["key"], set(e.get("values") or [])
        ok = {
            "In": k in labels and labels[k] in values,
            "NotIn": k not in labels or labels[k] not in values,
            "Exists": k in labels,
            "DoesNotExist": k not in labels,
        }[op]
        if not ok:
            return False
    return True


def shares_with(contribution: JSON, composite_key: str) -> bool:
    """Consent: the contribution's owner listed this composite (namespace/name)."""
    forges = ((contribution.get("spec") or {}).get("sharing") or {}).get("forges") or []
    return composite_key in forges


def reason_code(text: str) -> str:
    """The code of a stored reason ("Code" or, in statuses written before codes, "Code: text")."""
    return text.split(":", 1)[0].strip() or "Excluded"


def key(c: JSON) -> str:
    return f"{c['metadata']['namespace']}/{c['metadata']['name']}"


def ready_since(c: JSON) -> str:
    for cond in (c.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return str(cond.get("lastTransitionTime", ""))
    return ""


def evaluate_inputs(
    composite: JSON, contribs: list[JSON], base_digest: str | None
) -> tuple[list[JSON], list[JSON]]:
    """(status.inputs, candidates): every contribution shared with this composite, with its
    state and a reason code (never another hospital's messages or URIs), and the Ready ones
    not merged yet, in the order they became Ready (the MedForge arrival order). Without a
    usable base model (None) nothing is a candidate."""
    status = composite.get("status") or {}
    current = status.get("current") or {}
    merged = {i["digest"]: i for i in current.get("inputs") or []}
    excluded: dict[str, str] = status.get("excluded") or {}
    pending = status.get("pendingRevision") or {}
    in_flight = set(pending.get("digests") or [])
    inputs: list[JSON] = []
    candidates: list[JSON] = []
    for c in sorted(contribs, key=lambda c: (ready_since(c), key(c))):
        st = c.get("status") or {}
        art = st.get("artifact") or {}
        digest = art.get("digest", "")
        entry: JSON = {"namespace": c["metadata"]["namespace"], "name": c["metadata"]["name"]}
        if digest:
            entry["digest"] = digest
        if not is_true(st.get("conditions"), "Ready") or st.get("observedGeneration") != c[
            "metadata"
        ].get("generation"):
            if st.get("phase") == "Failed":
                entry |= {"state": "Excluded", "reason": "TrainingFailed"}
            else:
                entry |= {"state": "Pending", "reason": "NotReady"}
        elif digest in merged:
            entry |= {
                "state": "Included",
                "reason": "Merged",
                "revision": current.get("revision"),
                "coefficient": merged[digest].get("coefficient"),
            }
        elif base_digest is None:
            entry |= {"state": "Pending", "reason": "BaseModelNotReady"}
        elif art.get("baseModelDigest") != base_digest:
            entry |= {"state": "Excluded", "reason": "BaseModelMismatch"}
        elif digest in excluded:
            entry |= {"state": "Excluded", "reason": reason_code(excluded[digest])}
        elif digest in in_flight:
            entry |= {"state": "Pending", "reason": "Merging", "revision": pending.get("revision")}
            candidates.append(c)
        else:
            entry |= {"state": "Pending", "reason": "Queued"}
            candidates.append(c)
        inputs.append({k: v for k, v in entry.items() if v is not None})
    return inputs, candidates


@dataclass
class Plan:
    revision: int
    new: list[JSON]  # contributions this revision adds
    all_inputs: list[JSON]  # contributions the merge reads (new ones, or all for `full`)


# TIES and DARE composites hold dense updates, which cannot be merged into again as factors: their
# revisions always merge every input afresh.
DENSE_STRATEGIES = ("ties", "dare-linear", "dare-ties")


def effective_integration(spec: JSON) -> str:
    if (spec.get("strategy") or {}).get("type") in DENSE_STRATEGIES:
        return "full"
    return str(spec.get("integration", "incremental"))


def plan_revision(composite: JSON, candidates: list[JSON], contribs: list[JSON]) -> Plan | None:
    """The next revision to start, if any."""
    spec, status = composite["spec"], composite.get("status") or {}
    if spec.get("paused") or status.get("pendingRevision") or not candidates:
        return None
    current = status.get("current")
    if current is None and len(candidates) < int(spec.get("minContributions", 1)):
        return None
    revision = int(status.get("revision") or 0) + 1
    if current is not None and effective_integration(spec) == "full":
        merged = {i["digest"] for i in current.get("inputs") or []}
        included = [
            c
            for c in contribs
            if (c.get("status") or {}).get("artifact", {}).get("digest") in merged
        ]
        return Plan(revision, candidates, included + candidates)
    return Plan(revision, candidates, candidates)


def output_prefix(bucket: str, namespace: str, name: str, revision: int) -> S3Uri:
    return S3Uri(bucket, f"composites/{namespace}/{name}/rev-{revision}/")


def artifact_refs(prefix: S3Uri, files: list[str]) -> list[JSON]:
    """An artifact's files (manifest first) as a job plan lists them."""
    names_ = ["manifest.json", *[f for f in files if f != "manifest.json"]]
    return [{"name": f, "get": str(prefix.join(f))} for f in names_]


def merge_plan(
    composite: JSON,
    plan: Plan,
    base: basemodel.Resolved,
    output_uri: S3Uri,
    bucket: str,
) -> JSON:
    """The merge Job's config with store URIs in place of URLs (signed when the Job may start).
    Inputs are read from where the operator itself verified them, in the forge bucket only."""
    spec, status = composite["spec"], composite.get("status") or {}
    current = status.get("current")
    incremental = effective_integration(spec) == "incremental" and current is not None
    inputs = []
    for c in plan.all_inputs:
        art = c["status"]["artifact"]
        meta = c["metadata"]
        prefix = S3Uri(bucket, f"contributions/{meta['namespace']}/{meta['name']}/")
        uri = str(art.get("uri", ""))
        if not uri.startswith(f"s3://{bucket}/{prefix.key}"):
            raise ValueError(f"{key(c)}: status.artifact.uri is outside its contribution prefix")
        inputs.append(
            {
                "namespace": meta["namespace"],
                "name": meta["name"],
                "digest": art["digest"],
                "task": art.get("task"),
                "files": artifact_refs(
                    S3Uri(bucket, uri.removeprefix(f"s3://{bucket}/")), art.get("files", [])
                ),
            }
        )
    cfg: JSON = {
        "kind": "merge",
        "composite": {
            "namespace": composite["metadata"]["namespace"],
            "name": composite["metadata"]["name"],
            "revision": plan.revision,
        },
        "baseModel": {"name": base.name, "digest": base.digest, "files": base.file_refs()},
        "strategy": spec.get("strategy", {}),
        "integration": "incremental" if incremental else "full",
        "inputs": inputs,
        "gate": spec.get("gate", {}),
        "output": {
            "uri": str(output_uri),
            "files": {f: jobs.put_ref(output_uri.join(f)) for f in OUTPUT_FILES},
        },
    }
    if current is not None:
        # Regressions are measured against the revision this one replaces, in either mode.
        cfg["previous"] = {"revision": current["revision"], "metrics": current.get("metrics", {})}
    if incremental and current is not None:
        cprefix = output_prefix(
            bucket, composite["metadata"]["namespace"], composite["metadata"]["name"], 0
        )
        uri = str(current["uri"])
        if not uri.startswith(f"s3://{bucket}/{cprefix.key.removesuffix('rev-0/')}"):
            raise ValueError("status.current.uri is outside this composite's prefix")
        cfg["current"] = {
            "revision": current["revision"],
            "digest": current["digest"],
            "metrics": current.get("metrics", {}),
            "files": artifact_refs(
                S3Uri(bucket, uri.removeprefix(f"s3://{bucket}/")), current.get("files", [])
            ),
        }
    return cfg


def merge_job(composite: JSON, plan: Plan, settings: Settings, job_plan: JSON) -> JSON:
    meta, spec = composite["metadata"], composite["spec"]
    return jobs.job_manifest(
        name=names.merge_job_name(meta["name"], plan.revision),
        namespace=meta["namespace"],
        owner=composite,
        component="merge",
        image=settings.merger_image,
        command=list(settings.merger_command),
        plan=job_plan,
        url_lifetime=settings.presign_expiry_seconds,
        annotations={jobs.ANNOTATION_BASE_DIGEST: job_plan["baseModel"]["digest"]},
        env=[],
        labels={jobs.LABEL_OWNER: meta["name"], jobs.LABEL_REVISION: str(plan.revision)},
        resources=spec.get("resources") or {},
        volumes=[],
        volume_mounts=[],
        backoff_limit=1,
        active_deadline=None,
        ttl_seconds=settings.job_ttl_seconds,
    )


def gate(result: JSON, max_regression: float) -> tuple[bool, str]:
    """Accept unless some task regressed by more than the gate allows."""
    worst = max(
        ((float(v), t) for t, v in (result.get("regression") or {}).items()), default=(0.0, "")
    )
    if worst[0] > max_regression:
        return False, (
            f"task {worst[1]} regressed by {worst[0]:.3f}, more than "
            f"gate.maxRegression {max_regression:.3f}"
        )
    return True, "no task regressed beyond the gate"


@dataclass
class Outcome:
    """How a finished merge ended (None fields when still running)."""

    state: str  # Accepted | Rejected | Failed | Running | StoreUnreachable
    message: str = ""
    result: JSON = field(default_factory=dict)


def finish_revision(
    status: JSON,
    pending: JSON,
    outcome: Outcome,
    uri: str,
    job_name: str,
    history_limit: int,
    at: str,
) -> JSON:
    """Status fields after a revision ended: current, history, excluded."""
    out: JSON = {}
    excluded = dict(status.get("excluded") or {})
    res = outcome.result
    for i in res.get("inputs") or []:
        if i.get("state") == "Excluded" and i.get("digest"):
            # A code only: the merger's text about a hospital's input goes to that hospital (an
            # Event on its contribution), not into the forge's status.
            excluded[i["digest"]] = "ExcludedByMerger"
    entry: JSON = {
        "revision": pending["revision"],
        "state": outcome.state,
        "message": outcome.message,
        "jobName": job_name,
        "completedAt": at,
    }
    if outcome.state == "Accepted":
        art = res["artifact"]
        merged = [i for i in res.get("inputs") or [] if i.get("state", "Included") == "Included"]
        prev = (status.get("current") or {}).get("inputs") or []
        if res.get("integration") == "incremental" or pending.get("incremental"):
            known = {i["digest"] for i in merged}
            merged = [*[p for p in prev if p["digest"] not in known], *merged]
        out["current"] = {
            "revision": pending["revision"],
            "uri": uri,
            "digest": art["digest"],
            "files": art.get("files", []),
            "metrics": res.get("metrics", {}),
            "score": res.get("score"),
            "jobName": job_name,
            "completedAt": at,
            "inputCount": len(merged),
            "inputs": merged,
        }
        entry |= {"digest": art["digest"], "score": res.get("score")}
    else:
        for d in pending.get("digests") or []:
            excluded.setdefault(
                d, "RejectedByGate" if outcome.state == "Rejected" else "MergeFailed"
            )
    out["excluded"] = excluded
    out["history"] = [entry, *(status.get("history") or [])][:history_limit]
    return out


def conditions_for(
    status: JSON,
    generation: int,
    paused: bool,
    running: JSON | None,
    problem: tuple[str, str] | None,
) -> tuple[str, list[Cond]]:
    """(phase, conditions) from the composite's state."""
    current = status.get("current")
    last = (status.get("history") or [{}])[0]
    merged = Cond("Merged", None, "NoRevisionYet", "")
    accepted = Cond("Accepted", None, "NoRevisionYet", "")
    if last:
        ok = last.get("state") == "Accepted"
        merged = Cond(
            "Merged",
            last.get("state") != "Failed",
            last.get("state", ""),
            f"revision {last.get('revision')}: {last.get('message', '')}",
        )
        accepted = Cond(
            "Accepted",
            ok,
            "RevisionAccepted"
            if ok
            else ("RegressionOverGate" if last.get("state") == "Rejected" else "MergeFailed"),
            f"revision {last.get('revision')}: {last.get('message', '')}",
        )
    if problem:
        reason, message = problem
        phase = "Failed" if current is None else "Ready"
        return phase, [
            Cond("Ready", current is not None and reason != "StoreUnreachable", reason, message),
            Cond("Reconciling", False, reason, ""),
            Cond("Stalled", True, reason, message),
            merged,
            accepted,
        ]
    if running:
        msg = f"merging revision {running['revision']}"
        return "Merging", [
            Cond("Ready", current is not None, "Merging" if current is None else "Serving", msg),
            Cond("Reconciling", True, "Merging", msg),
            Cond("Stalled", False, "Merging", ""),
            merged,
            accepted,
        ]
    if paused:
        return "Paused", [
            Cond("Ready", current is not None, "Paused", "spec.paused is true"),
            Cond("Reconciling", False, "Paused", ""),
            Cond("Stalled", False, "Paused", ""),
            merged,
            accepted,
        ]
    if current is None:
        msg = "waiting for enough Ready contributions (spec.minContributions)"
        return "Waiting", [
            Cond("Ready", False, "WaitingForContributions", msg),
            Cond("Reconciling", True, "WaitingForContributions", msg),
            Cond("Stalled", False, "WaitingForContributions", ""),
            merged,
            accepted,
        ]
    msg = f"serving revision {current['revision']}"
    return "Ready", [
        Cond("Ready", True, "RevisionReady", msg),
        Cond("Reconciling", False, "Idle", ""),
        Cond("Stalled", False, "Idle", ""),
        merged,
        accepted,
    ]


def build_status(
    old: JSON, generation: int, inputs: list[JSON], phase: str, conds: list[Cond], extra: JSON
) -> JSON:
    status = {
        k: v
        for k, v in old.items()
        if k in ("revision", "current", "history", "excluded", "pendingRevision")
    }
    status |= extra
    status |= {
        "observedGeneration": generation,
        "phase": phase,
        "inputs": inputs,
        "conditions": merge_conditions(old.get("conditions"), conds, generation),
    }
    return {k: v for k, v in status.items() if v is not None}
