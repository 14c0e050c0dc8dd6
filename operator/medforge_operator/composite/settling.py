"""How a revision ends: the gate, the merger's result against the previous revision's scores,
retries and the isolation of inputs that break merges."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from medforge_common import gate as gate_rule
from medforge_common.api import InputReason as IR
from medforge_common.api import InputState as IS
from medforge_common.api import Reason as R
from medforge_common.api import RevisionState
from medforge_common.result import finite_number
from medforge_operator import basemodel, isolation
from medforge_operator.composite import withdrawal

HISTORY_WITH_SITES = 10  # older history entries drop their per-site figures (object size)

JSON = dict[str, Any]


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
    # A Failed Job that its inputs can explain (jobstatus.caused_by_inputs), as opposed to a fault of
    # the store or the node, which is retried and never counts toward isolating an input.
    by_inputs: bool = False
    # Per-site figures of a candidate scored at the sites (sites.settled_sites).
    sites: list[JSON] = field(default_factory=list)
    # Rejected with nobody to blame (no quorum): the new inputs wait for another arrival.
    awaiting: list[str] = field(default_factory=list)


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
    # spec.requireSignatures: each namespace's Active key ids, from the Institutions.
    trust: dict[str, frozenset[str]] = field(default_factory=dict)
    started: JSON | None = None  # the pendingRevision of a merge Job created this round
    start_problem: tuple[str, str] | None = None
    # Inputs that left this round (deleted, consent withdrawn) and what that changes.
    departures: list[withdrawal.Departure] = field(default_factory=list)
    withdrawal: withdrawal.Withdrawal | None = None
    # The pending revision while the sites score its candidate (reconcile_evaluation).
    evaluating: JSON | None = None
    # Events for the sites, in their own namespaces: (object, type, reason, message).
    site_events: list[tuple[Any, str, str, str]] = field(default_factory=list)


def in_flight(status: JSON, o: Observation) -> JSON | None:
    """The pending revision while its Job runs (or its upload cannot be checked yet)."""
    if o.started is not None:
        return o.started
    if o.evaluating is not None:
        return o.evaluating
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
    if pending and o.evaluating is not None:
        return {"pendingRevision": o.evaluating}
    if not pending or in_flight(status, o) is not None:
        return {}
    if o.outcome is None:  # the Job is gone before it ended: start that revision over
        return {"pendingRevision": None}
    done = finish_revision(
        status, pending, o.outcome, o.outcome.uri, o.outcome.job_name, history_limit, at
    )
    return done | {"pendingRevision": None}


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
    accepted_inputs = None
    if outcome.state == RevisionState.ACCEPTED:
        art = res["artifact"]
        out["current"] = accepted_current(status, pending, res, uri, job_name, at)
        accepted_inputs = out["current"]["inputs"]
        # Per-task metrics too: `medforge describe` charts each task over the revisions. The
        # files let a withdrawal serve this revision again without reading the store.
        entry |= {
            "digest": art["digest"],
            "score": res.get("score"),
            "metrics": res.get("metrics", {}),
            "files": art.get("files", []),
            **({"signature": art["signature"]} if art.get("signature") else {}),
        }
    if pending.get("replacement"):
        entry["replacement"] = True
    if outcome.sites:
        entry["sites"] = outcome.sites
    if outcome.awaiting:
        entry["awaiting"] = outcome.awaiting
    # Every input whose update these files hold, so that a withdrawal finds them.
    entry["inputs"] = withdrawal.revision_sources(status, pending, accepted_inputs)
    out |= withdrawal.after_replacement(status, pending, outcome.state, at)
    changes, blamed = after_revision(status, pending, outcome, excluded, at)
    for d, code in blamed.items():
        excluded.setdefault(d, code)
    out |= changes
    out["excluded"] = excluded
    out["history"] = with_entry(status, entry, history_limit)
    return out


def with_entry(status: JSON, entry: JSON, limit: int) -> list[JSON]:
    """status.history with the newest entry first; the revision x site matrix is kept for the
    newest HISTORY_WITH_SITES revisions only (50 sites each at most)."""
    history = [entry, *(status.get("history") or [])][:limit]
    return [
        {k: v for k, v in h.items() if k != "sites"} if i >= HISTORY_WITH_SITES else h
        for i, h in enumerate(history)
    ]


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
    blank = {k: None for k in status.get("current") or {}}  # a merge patch keeps the rest
    return blank | {
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
        "signature": art.get("signature"),  # the forge's, as the operator verified it
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
        no_blame = outcome.reason == R.NO_USABLE_INPUT or bool(outcome.awaiting)
        return isolation.VERDICT if no_blame else isolation.REJECTED
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
    if pending.get("replacement"):
        # A withdrawal's replacement adds nothing to blame: retried while it fails, an
        # isolation under way goes on after it.
        if result in (isolation.FAILED, isolation.FAULT):
            return {
                "retry": {
                    "attempt": attempts + 1,
                    "notBefore": later(at, retry_delay(attempts + 1)),
                }
            }, {}
        return {"retry": None}, {}
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
