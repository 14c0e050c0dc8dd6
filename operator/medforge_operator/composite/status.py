"""A CompositeModel's status from an observation: phase, conditions and the inputs shown (pure)."""

from __future__ import annotations

from typing import Any

from medforge_common.api import CompositePhase as Phase
from medforge_common.api import ConditionType as C
from medforge_common.api import InputState as IS
from medforge_common.api import Reason as R
from medforge_common.api import RevisionState
from medforge_operator import isolation
from medforge_operator.bodies import Obj
from medforge_operator.composite.inputs import evaluate_inputs
from medforge_operator.composite.settling import Observation, in_flight
from medforge_operator.composite.sites import ANSWERED
from medforge_operator.conditions import Cond, merge_conditions, progressing, steady

JSON = dict[str, Any]


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


def compute_status(old: JSON, composite: Obj, o: Observation, changes: JSON) -> JSON:
    """The new status: `composite` carries the status after this round's changes (`changes`,
    the fields settle and a started revision set)."""
    status = composite.get("status") or {}
    inputs, candidates = evaluate_inputs(
        composite, o.contribs, o.base.digest if o.base else None, o.trust
    )
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
    # A BaseModel still being verified is a wait, as for a contribution (Pending): not Failed.
    if current is None and (retrying or reason == R.BASE_MODEL_NOT_READY):
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
    if status.get("rebuild"):
        return _withdrawing(status, running, merged, accepted)
    if running and running.get("evaluation"):
        ev = running["evaluation"]
        done = sum(1 for x in ev.get("sites") or [] if x.get("state") in ANSWERED)
        msg = (
            f"revision {running['revision']} is scored at the sites: {done} of "
            f"{len(ev.get('sites') or [])} answered (timeout {ev.get('deadline')})"
        )
        return Phase.EVALUATING, [
            *progressing(R.EVALUATING, msg, ready=current is not None, ready_reason=R.SERVING),
            merged,
            accepted,
        ]
    if running:
        msg = f"merging revision {running['revision']}"
        ready_reason = R.MERGING if current is None else R.SERVING
        return R.MERGING, [
            *progressing(R.MERGING, msg, ready=current is not None, ready_reason=ready_reason),
            merged,
            accepted,
        ]
    if paused:
        # Paused is the user's intent, a steady state (kstatus Current), like waiting.
        return R.PAUSED, [*steady(R.PAUSED, "spec.paused is true"), merged, accepted]
    if current is None:
        msg = "waiting for enough Ready contributions (spec.minContributions)"
        # Waiting is a steady state, not work in progress: Ready (kstatus Current), so that a
        # GitOps tool waiting on the apply (Flux's wait, kpt) does not hang until hospitals
        # contribute. The reason says it waits.
        return Phase.WAITING, [*steady(R.WAITING_FOR_CONTRIBUTIONS, msg), merged, accepted]
    msg = f"serving revision {current['revision']}"
    return Phase.READY, [*steady(R.REVISION_READY, msg, quiet=R.IDLE), merged, accepted]


def _withdrawing(
    status: JSON, running: JSON | None, merged: Cond, accepted: Cond
) -> tuple[str, list[Cond]]:
    """While a withdrawal's replacement is to merge: what is served meanwhile (never a revision
    that holds the withdrawn input)."""
    current = status.get("current")
    left = len((status.get("rebuild") or {}).get("inputs") or [])
    serving = (
        f"serving revision {current['revision']}, the newest without it,"
        if current
        else "serving nothing"
    )
    step = f"revision {running['revision']} merges" if running else "a replacement merges next:"
    msg = (
        f"an input was withdrawn: {serving} until {step} the {left} remaining input(s) afresh "
        "and is accepted"
    )
    conds = progressing(R.WITHDRAWING, msg, ready=current is not None)
    return Phase.MERGING, [*conds, merged, accepted]


def build_status(
    old: JSON, generation: int, inputs: list[JSON], phase: str, conds: list[Cond], extra: JSON
) -> JSON:
    status = {
        k: v
        for k, v in old.items()
        if k
        in (
            "revision",
            "current",
            "history",
            "excluded",
            "pendingRevision",
            "retry",
            "isolation",
            "rebuild",
            "withdrawals",
        )
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
