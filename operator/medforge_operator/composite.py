"""CompositeModel: which contributions count, when a revision starts, the merge Job, the gate
and the status (pure functions)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from medforge_common import gate as gate_rule
from medforge_common.api import CompositePhase as Phase
from medforge_common.api import ConditionType as C
from medforge_common.api import ContributionPhase, ExitCode, RevisionState
from medforge_common.api import InputReason as IR
from medforge_common.api import InputState as IS
from medforge_common.api import Reason as R
from medforge_common.artifacts import COMPOSITE_FILES, MANIFEST_FILE
from medforge_common.result import finite_number
from medforge_common.strategy import DEFAULT as DEFAULT_STRATEGY
from medforge_common.strategy import STRATEGIES, Traits
from medforge_common.uris import S3Uri
from medforge_operator import basemodel, contribution, isolation, jobs, names, signing
from medforge_operator.conditions import Cond, is_true, merge_conditions
from medforge_operator.conditions import get as get_condition
from medforge_operator.settings import Settings

JSON = dict[str, Any]
OUTPUT_FILES = COMPOSITE_FILES


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
    return text.split(":", 1)[0].strip() or IS.EXCLUDED


def key(c: JSON) -> str:
    return f"{c['metadata']['namespace']}/{c['metadata']['name']}"


def ready_since(c: JSON) -> str:
    ready = get_condition((c.get("status") or {}).get("conditions"), C.READY) or {}
    return str(ready.get("lastTransitionTime", ""))


def has_verified_copy(c: JSON) -> bool:
    """Whether status.artifact.uri is the operator's own verified copy of this very object's
    artifact (a contribution verified before copies were kept waits for its copy)."""
    return contribution.has_verified_copy(c)


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
        if not is_true(st.get("conditions"), C.READY) or st.get("observedGeneration") != c[
            "metadata"
        ].get("generation"):
            if st.get("phase") == ContributionPhase.FAILED:
                entry |= {"state": IS.EXCLUDED, "reason": IR.TRAINING_FAILED}
            else:
                entry |= {"state": IS.PENDING, "reason": IR.NOT_READY}
        elif digest in merged:
            entry |= {
                "state": IS.INCLUDED,
                "reason": IR.MERGED,
                "revision": current.get("revision"),
                "coefficient": merged[digest].get("coefficient"),
            }
        elif base_digest is None:
            entry |= {"state": IS.PENDING, "reason": IR.BASE_MODEL_NOT_READY}
        elif art.get("baseModelDigest") != base_digest:
            entry |= {"state": IS.EXCLUDED, "reason": IR.BASE_MODEL_MISMATCH}
        elif not has_verified_copy(c):
            entry |= {"state": IS.PENDING, "reason": IR.NOT_READY}
        elif digest in excluded:
            entry |= {"state": IS.EXCLUDED, "reason": reason_code(excluded[digest])}
        elif digest in in_flight:
            entry |= {
                "state": IS.PENDING,
                "reason": IR.MERGING,
                "revision": pending.get("revision"),
            }
            candidates.append(c)
        else:
            entry |= {"state": IS.PENDING, "reason": IR.QUEUED}
            candidates.append(c)
        inputs.append({k: v for k, v in entry.items() if v is not None})
    return inputs, candidates


@dataclass
class Plan:
    revision: int
    new: list[JSON]  # contributions this revision adds
    all_inputs: list[JSON]  # contributions the merge reads (new ones, or all for `full`)


def effective_integration(spec: JSON, registry: Mapping[str, Traits] = STRATEGIES) -> str:
    """A strategy whose composite is no sum (dense TIES and DARE updates, the subspace merges)
    cannot take new inputs into its parent revision: every revision merges all inputs afresh."""
    name = (spec.get("strategy") or {}).get("type") or DEFAULT_STRATEGY
    known = registry.get(name)
    if known is not None and not known.incremental:
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
    trial = isolation.group(status.get("isolation"))
    if trial is not None:
        # Isolating: only the group under trial, newcomers wait until it is over.
        candidates = [c for c in candidates if c["status"]["artifact"]["digest"] in trial]
        if not candidates:
            return None
    if current is not None and effective_integration(spec) == "full":
        merged = {i["digest"] for i in current.get("inputs") or []}
        included = [
            c
            for c in contribs
            if (c.get("status") or {}).get("artifact", {}).get("digest") in merged
        ]
        return Plan(revision, candidates, included + candidates)
    return Plan(revision, candidates, candidates)


def output_prefix(bucket: str, obj: JSON, revision: int) -> S3Uri:
    """Where a revision's merge Job uploads; the composite's uid is part of it (as for
    contributions)."""
    meta = obj["metadata"]
    return signing.revision_output(bucket, meta["namespace"], meta["name"], meta["uid"], revision)


def verified_prefix(bucket: str, obj: JSON, revision: int) -> S3Uri:
    """The operator's own copy of a verified revision: what later merges and pulls read."""
    meta = obj["metadata"]
    return signing.verified_revision(bucket, meta["namespace"], meta["name"], meta["uid"], revision)


def artifact_refs(prefix: S3Uri, files: list[str]) -> list[JSON]:
    """An artifact's files (manifest first) as a job plan lists them."""
    names_ = [MANIFEST_FILE, *[f for f in files if f != MANIFEST_FILE]]
    return [{"name": f, "get": str(prefix.join(f))} for f in names_]


def input_prefix(bucket: str, c: JSON) -> S3Uri:
    """Where a contribution's verified copy lies, derived from its identity and digest; the
    status must agree (an artifact verified before the operator kept copies waits for its copy)."""
    art = c["status"]["artifact"]
    meta = c["metadata"]
    prefix = signing.verified_contribution(
        bucket, meta["namespace"], meta["name"], meta["uid"], str(art.get("digest", ""))
    )
    if str(art.get("uri", "")) != str(prefix):
        raise ValueError(f"{key(c)}: status.artifact.uri is not its verified copy yet")
    return prefix


def merge_inputs(
    pending: JSON, contribs: list[JSON], base_digest: str
) -> tuple[list[JSON], list[JSON]]:
    """(new, all) inputs of a pending revision, found again among the contributions that still
    consent, are Ready and were trained for its base model: the plan a merge Job is signed for
    is derived afresh each time from these, never read back from the Job."""
    wanted = set(pending.get("inputs") or pending.get("digests") or [])
    new_digests = set(pending.get("digests") or [])
    found: list[JSON] = []
    for c in contribs:
        st = c.get("status") or {}
        art = st.get("artifact") or {}
        if (
            art.get("digest") in wanted
            and is_true(st.get("conditions"), C.READY)
            and st.get("observedGeneration") == c["metadata"].get("generation")
            and art.get("baseModelDigest") == base_digest
        ):
            found.append(c)
    order = {d: i for i, d in enumerate(pending.get("inputs") or pending.get("digests") or [])}
    found.sort(key=lambda c: order.get(c["status"]["artifact"]["digest"], 0))
    return [c for c in found if c["status"]["artifact"]["digest"] in new_digests], found


def merge_plan(
    composite: JSON,
    plan: Plan,
    base: basemodel.Resolved,
    output_uri: S3Uri,
    bucket: str,
) -> JSON:
    """The merge Job's config with store URIs in place of URLs (signed when the Job may start).
    Inputs are read from the operator's verified copies, in the forge bucket only."""
    spec, status = composite["spec"], composite.get("status") or {}
    current = status.get("current")
    incremental = effective_integration(spec) == "incremental" and current is not None
    inputs = []
    new = {c["status"]["artifact"]["digest"] for c in plan.new}
    for c in plan.all_inputs:
        art = c["status"]["artifact"]
        meta = c["metadata"]
        inputs.append(
            {
                "namespace": meta["namespace"],
                "name": meta["name"],
                "digest": art["digest"],
                # Inputs merged before are never blamed for a newcomer's regression.
                "new": art["digest"] in new,
                "task": art.get("task"),
                "files": artifact_refs(input_prefix(bucket, c), art.get("files", [])),
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
        cprefix = verified_prefix(bucket, composite, int(current["revision"]))
        if str(current["uri"]) != str(cprefix):
            raise ValueError("status.current.uri is not this composite's verified revision")
        cfg["current"] = {
            "revision": current["revision"],
            "digest": current["digest"],
            "metrics": current.get("metrics", {}),
            "files": artifact_refs(cprefix, current.get("files", [])),
        }
    return cfg


def merge_grant(
    bucket: str, composite: JSON, plan: Plan, base: basemodel.Resolved
) -> signing.Grant:
    return signing.merge_grant(
        bucket, composite, plan.revision, base.uri, base.files, plan.all_inputs
    )


def merge_job(composite: JSON, plan: Plan, settings: Settings, job_plan: JSON) -> JSON:
    meta, spec = composite["metadata"], composite["spec"]
    return jobs.job_manifest(
        name=names.merge_job_name(meta["name"], plan.revision),
        namespace=meta["namespace"],
        owner=composite,
        component="merge",
        image=settings.merger_image,
        command=list(settings.merger_command),
        annotations={jobs.ANNOTATION_BASE_DIGEST: job_plan["baseModel"]["digest"]},
        env=[],
        labels={jobs.LABEL_REVISION: str(plan.revision)},
        resources=spec.get("resources") or {},
        volumes=[],
        volume_mounts=[],
        backoff_limit=1,
        active_deadline=None,
        ttl_seconds=settings.job_ttl_seconds,
        verdict_exit_codes=(ExitCode.VERDICT,),
    )


def gate(result: JSON, previous: JSON, spec_gate: Any) -> tuple[bool, str]:
    """Accept unless at least gate.corroboration tasks regress significantly, measured
    against the metrics this operator recorded for the revision replaced (`previous`), never
    against what the merger says they were."""
    return gate_rule.verdict(previous, result.get("metrics"), gate_rule.Rule.from_spec(spec_gate))


@dataclass
class Outcome:
    """How a finished merge Job ended: a revision state, or StoreUnreachable while its upload
    cannot be checked (then it is still in flight)."""

    state: str  # RevisionState, or Reason.STORE_UNREACHABLE
    message: str = ""
    result: JSON = field(default_factory=dict)
    uri: str = ""
    job_name: str = ""
    reason: str = ""  # for the Accepted condition, when it is not the state's usual one
    # A Failed Job that its inputs can explain (jobs.caused_by_inputs), as opposed to a fault of
    # the store or the node, which is retried and never counts toward isolating an input.
    by_inputs: bool = False


@dataclass
class Observation:
    """What a round of a composite saw, and what it did (a merge Job started, or refused);
    the status is a pure function of it."""

    generation: int
    job: JSON | None = None  # the pending revision's Job; None when none is pending or it is gone
    outcome: Outcome | None = None  # how the pending revision's Job ended, once it did
    base: basemodel.Resolved | None = None
    base_problem: tuple[str, str] | None = None
    contribs: list[JSON] = field(default_factory=list)
    started: JSON | None = None  # the pendingRevision of a merge Job created this round
    start_problem: tuple[str, str] | None = None


def in_flight(status: JSON, o: Observation) -> JSON | None:
    """The pending revision while its Job runs (or its upload cannot be checked yet)."""
    if o.started is not None:
        return o.started
    pending = status.get("pendingRevision")
    if not pending or o.job is None:
        return None
    if o.outcome is None or o.outcome.state == R.STORE_UNREACHABLE:
        return dict(pending)
    return None


def settle(status: JSON, o: Observation, history_limit: int, at: str) -> JSON:
    """Status fields to change once the pending revision ended (current, history, excluded)
    or was lost before it ran (it starts over); a None value removes the field."""
    pending = status.get("pendingRevision")
    if not pending or in_flight(status, o) is not None:
        return {}
    if o.outcome is None:  # the Job is gone before it ended: start that revision over
        return {"pendingRevision": None}
    done = finish_revision(
        status, pending, o.outcome, o.outcome.uri, o.outcome.job_name, history_limit, at
    )
    return done | {"pendingRevision": None}


def next_plan(composite: JSON, o: Observation, at: str) -> Plan | None:
    """The revision to start now (`at`), if any (`composite` carries the settled status)."""
    status = composite.get("status") or {}
    if at < str((status.get("retry") or {}).get("notBefore", "")):
        return None  # a failed revision's backoff
    # A failed revision does not block the next one (its inputs are excluded); a store that
    # cannot be reached, a refused start or an unusable base model do.
    blocked = o.start_problem or o.base_problem
    if o.base is None or blocked or in_flight(status, o) is not None:
        return None
    _, candidates = evaluate_inputs(composite, o.contribs, o.base.digest)
    return plan_revision(composite, candidates, o.contribs)


def problem_of(status: JSON, o: Observation) -> tuple[str, str] | None:
    """What keeps the composite from moving on, in order of what to fix first."""
    if o.outcome is not None and o.outcome.state == R.STORE_UNREACHABLE:
        return (R.STORE_UNREACHABLE, o.outcome.message)
    problem = o.start_problem or o.base_problem
    last = (status.get("history") or [{}])[0]
    failed = last.get("state") == RevisionState.FAILED and in_flight(status, o) is None
    iso = status.get("isolation")
    if problem is None and iso and in_flight(status, o) is None:
        groups = iso.get("groups") or []
        why = "failed twice" if iso.get("cause") == R.MERGE_FAILED else "regressed"
        problem = (
            R.ISOLATING,
            f"revision {iso.get('revision')} {why}: its new inputs are tried in groups to find "
            f"the one that causes it ({len(groups)} group(s) left)",
        )
    if problem is None and failed:
        retry = status.get("retry") or {}
        when = (
            f"; retrying at {retry['notBefore']} (attempt {retry['attempt'] + 1})" if retry else ""
        )
        problem = (R.MERGE_FAILED, f"revision {last['revision']}: {last.get('message', '')}{when}")
    return problem


def compute_status(old: JSON, composite: JSON, o: Observation, changes: JSON) -> JSON:
    """The new status: `composite` carries the status after this round's changes (`changes`,
    the fields settle and a started revision set)."""
    status = composite.get("status") or {}
    inputs, candidates = evaluate_inputs(composite, o.contribs, o.base.digest if o.base else None)
    paused = bool(composite["spec"].get("paused"))
    phase, conds = conditions_for(status, paused, in_flight(status, o), problem_of(status, o))
    # Exclusions of adapters no contribution carries any more (deleted, retrained, no longer
    # shared) go: the map stays as large as the inputs, not as their history.
    digests = {((c.get("status") or {}).get("artifact") or {}).get("digest") for c in o.contribs}
    excluded = status.get("excluded") or {}
    kept = {d: r for d, r in excluded.items() if d in digests}
    if kept != excluded or "excluded" in changes:
        changes = {**changes, "excluded": kept}
    # An input withdrawn, retrained or excluded meanwhile is no suspect any more.
    iso = status.get("isolation")
    waiting = {c["status"]["artifact"]["digest"] for c in candidates}
    if iso and o.base is not None and (pruned := isolation.prune(iso, waiting)) != iso:
        changes = {**changes, "isolation": pruned}
    return build_status(old, o.generation, inputs, phase, conds, changes)


# status.inputs lists at most this many contributions; inputCounts counts them all.
INPUTS_SHOWN = 200


# A failed merge is retried after 30 s, 1 min, 2 min, ... at most an hour apart.
RETRY_BASE_SECONDS = 30
RETRY_MAX_SECONDS = 3600


def retry_delay(attempt: int) -> int:
    return int(min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2 ** min(attempt - 1, 20)))


def later(at: str, seconds: int) -> str:
    """An RFC 3339 time (as conditions.now writes them) plus some seconds."""
    t = dt.datetime.strptime(at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    return (t + dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


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
        if i.get("state") == IS.EXCLUDED and i.get("digest"):
            # A code only: the merger's text about a hospital's input goes to that hospital (an
            # Event on its contribution), not into the forge's status.
            excluded[i["digest"]] = merger_code(i)
    entry: JSON = {
        "revision": pending["revision"],
        "state": outcome.state,
        **({"reason": outcome.reason} if outcome.reason else {}),
        "message": outcome.message,
        "jobName": job_name,
        "startedAt": pending.get("startedAt"),
        "completedAt": at,
        "attempt": int(finite_number((status.get("retry") or {}).get("attempt")) or 0) + 1,
        **merge_figures(res.get("merge")),
    }
    entry = {k: v for k, v in entry.items() if v is not None}
    if outcome.state == RevisionState.ACCEPTED:
        art = res["artifact"]
        out["current"] = accepted_current(status, pending, res, uri, job_name, at)
        # Per-task metrics too: `medforge describe` charts each task over the revisions.
        entry |= {
            "digest": art["digest"],
            "score": res.get("score"),
            "metrics": res.get("metrics", {}),
        }
    changes, blamed = after_revision(status, pending, outcome, excluded, at)
    for d, code in blamed.items():
        excluded.setdefault(d, code)
    out |= changes
    out["excluded"] = excluded
    out["history"] = [entry, *(status.get("history") or [])][:history_limit]
    return out


def accepted_current(
    status: JSON, pending: JSON, res: JSON, uri: str, job_name: str, at: str
) -> JSON:
    """status.current for an accepted revision: an incremental one keeps the inputs merged
    before and adds the new ones."""
    art = res["artifact"]
    merged = [i for i in res.get("inputs") or [] if i.get("state", IS.INCLUDED) == IS.INCLUDED]
    prev = (status.get("current") or {}).get("inputs") or []
    if res.get("integration") == "incremental" or pending.get("incremental"):
        known = {i["digest"] for i in merged}
        merged = [*[p for p in prev if p["digest"] not in known], *merged]
    return {
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
        **merge_figures(res.get("merge")),
    }


def merger_code(entry: JSON) -> str:
    """The exclusion code of an input the merger excluded: its gate verdict when it names
    one, ExcludedByMerger for every reason found in the input itself."""
    return (
        IR.REJECTED_BY_GATE if entry.get("code") == IR.REJECTED_BY_GATE else IR.EXCLUDED_BY_MERGER
    )


def trial_result(outcome: Outcome) -> str:
    """How a revision ended, as isolation counts it."""
    if outcome.state == RevisionState.ACCEPTED:
        return isolation.MERGED
    if outcome.state == RevisionState.REJECTED:
        return isolation.VERDICT if outcome.reason == R.NO_USABLE_INPUT else isolation.REJECTED
    return isolation.FAILED if outcome.by_inputs else isolation.FAULT


def after_revision(
    status: JSON, pending: JSON, outcome: Outcome, excluded: JSON, at: str
) -> tuple[JSON, dict[str, str]]:
    """({retry, isolation}, {digest: exclusion code}) after a revision ended.

    A Job that failed as a whole is retried with backoff; twice by its inputs, its new inputs
    are isolated (tried in halves, the next trial at once). A rejected revision excludes its one
    new input, or isolates several (a regression no single input was found to cause)."""
    result = trial_result(outcome)
    stored = status.get("retry")
    retry: JSON = stored if isinstance(stored, dict) else {}
    attempts = int(finite_number(retry.get("attempt")) or 0)
    input_failures = int(finite_number(retry.get("inputFailures")) or 0)
    isolating = status.get("isolation")
    tried = [str(d) for d in pending.get("digests") or []]
    iso: JSON | None = None
    blamed: dict[str, str] = {}
    if isolating:
        iso, blamed = isolation.step(isolating, tried, result)
        if iso is None and not blamed and result == isolation.FAILED:
            input_failures = 0  # every trial failed: a fault; isolating again needs two more
    elif result == isolation.REJECTED:
        left = [d for d in tried if d not in excluded]
        iso = isolation.begin(int(pending["revision"]), left, R.REGRESSION_OVER_GATE)
        if iso is None:
            # A verdict on what this input did to the model: it is not merged again.
            blamed = {d: IR.REJECTED_BY_GATE for d in left}
    elif result == isolation.FAILED and input_failures + 1 >= isolation.BLAME_AFTER:
        iso = isolation.begin(int(pending["revision"]), tried, R.MERGE_FAILED)
    if result not in (isolation.FAILED, isolation.FAULT) or blamed:
        return {"retry": None, "isolation": iso}, blamed  # merged, or explained by a verdict
    # The Job failed as a whole. A fault (the store, a lost node) is retried with backoff and
    # counts toward nothing; a failure its inputs explain counts toward isolating them.
    attempt = attempts + 1
    at_once = iso is not None and result == isolation.FAILED
    return {
        "retry": {
            "attempt": attempt,
            "inputFailures": input_failures + (result == isolation.FAILED and iso is None),
            "notBefore": at if at_once else later(at, retry_delay(attempt)),
        },
        "isolation": iso,
    }, blamed


def merge_figures(figures: Any) -> JSON:
    """The merger's own figures (seconds, search evaluations) as revision fields: finite
    numbers only, whatever the result file held."""
    if not isinstance(figures, dict):
        return {}
    out: JSON = {}
    for key, field_name in (
        ("seconds", "mergeSeconds"),
        ("searchEvaluations", "searchEvaluations"),
    ):
        v = figures.get(key)
        if (n := finite_number(v)) is not None and n >= 0:
            out[field_name] = v
    return out


def revision_conditions(last: JSON) -> tuple[Cond, Cond]:
    """Merged and Accepted, from the newest finished revision (`last`, {} when none)."""
    if not last:
        return (
            Cond(C.MERGED, None, R.NO_REVISION_YET, ""),
            Cond(C.ACCEPTED, None, R.NO_REVISION_YET, ""),
        )
    ok = last.get("state") == RevisionState.ACCEPTED
    message = f"revision {last.get('revision')}: {last.get('message', '')}"
    merged = Cond(
        C.MERGED, last.get("state") != RevisionState.FAILED, last.get("state", ""), message
    )
    refused = (
        R.REGRESSION_OVER_GATE if last.get("state") == RevisionState.REJECTED else R.MERGE_FAILED
    )
    reason = R.REVISION_ACCEPTED if ok else last.get("reason") or refused
    return merged, Cond(C.ACCEPTED, ok, reason, message)


def problem_conditions(status: JSON, problem: tuple[str, str]) -> tuple[str, list[Cond]]:
    """(phase, Ready, Reconciling, Stalled) while something keeps the composite from moving on."""
    current = status.get("current")
    reason, message = problem
    # A merge that failed as a whole is retried by itself, and an isolation goes on by itself:
    # in progress, not stuck.
    retrying = (reason == R.MERGE_FAILED and bool(status.get("retry"))) or (reason == R.ISOLATING)
    phase = Phase.FAILED if current is None and not retrying else Phase.READY
    if current is None and retrying:
        phase = Phase.WAITING
    return phase, [
        Cond(C.READY, current is not None and reason != R.STORE_UNREACHABLE, reason, message),
        Cond(C.RECONCILING, retrying, reason, message if retrying else ""),
        Cond(C.STALLED, not retrying, reason, "" if retrying else message),
    ]


def conditions_for(
    status: JSON,
    paused: bool,
    running: JSON | None,
    problem: tuple[str, str] | None,
) -> tuple[str, list[Cond]]:
    """(phase, conditions) from the composite's state."""
    current = status.get("current")
    merged, accepted = revision_conditions((status.get("history") or [{}])[0])
    if problem:
        phase, conds = problem_conditions(status, problem)
        return phase, [*conds, merged, accepted]
    if running:
        msg = f"merging revision {running['revision']}"
        return R.MERGING, [
            Cond(C.READY, current is not None, R.MERGING if current is None else R.SERVING, msg),
            Cond(C.RECONCILING, True, R.MERGING, msg),
            Cond(C.STALLED, False, R.MERGING, ""),
            merged,
            accepted,
        ]
    if paused:
        return R.PAUSED, [
            # Paused is the user's intent, a steady state (kstatus Current), like waiting.
            Cond(C.READY, True, R.PAUSED, "spec.paused is true"),
            Cond(C.RECONCILING, False, R.PAUSED, ""),
            Cond(C.STALLED, False, R.PAUSED, ""),
            merged,
            accepted,
        ]
    if current is None:
        msg = "waiting for enough Ready contributions (spec.minContributions)"
        # Waiting is a steady state, not work in progress: Ready (kstatus Current), so that a
        # GitOps tool waiting on the apply (Flux's wait, kpt) does not hang until hospitals
        # contribute. The reason says it waits.
        return Phase.WAITING, [
            Cond(C.READY, True, R.WAITING_FOR_CONTRIBUTIONS, msg),
            Cond(C.RECONCILING, False, R.WAITING_FOR_CONTRIBUTIONS, ""),
            Cond(C.STALLED, False, R.WAITING_FOR_CONTRIBUTIONS, ""),
            merged,
            accepted,
        ]
    msg = f"serving revision {current['revision']}"
    return Phase.READY, [
        Cond(C.READY, True, R.REVISION_READY, msg),
        Cond(C.RECONCILING, False, R.IDLE, ""),
        Cond(C.STALLED, False, R.IDLE, ""),
        merged,
        accepted,
    ]


def build_status(
    old: JSON, generation: int, inputs: list[JSON], phase: str, conds: list[Cond], extra: JSON
) -> JSON:
    status = {
        k: v
        for k, v in old.items()
        if k
        in ("revision", "current", "history", "excluded", "pendingRevision", "retry", "isolation")
    }
    status |= extra
    counts = {state.value: 0 for state in IS}
    for i in inputs:
        counts[i["state"]] = counts.get(i["state"], 0) + 1
    status |= {
        "observedGeneration": generation,
        "phase": phase,
        "inputs": inputs[:INPUTS_SHOWN],
        "inputCounts": counts,
        "inputsOmitted": max(0, len(inputs) - INPUTS_SHOWN) or None,
        "conditions": merge_conditions(old.get("conditions"), conds, generation),
    }
    return {k: v for k, v in status.items() if v is not None}
