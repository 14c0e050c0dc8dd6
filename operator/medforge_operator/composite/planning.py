"""When a revision starts and what it merges: new inputs into the served revision (incremental) or
every input afresh (full)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from medforge_common.strategy import DEFAULT as DEFAULT_STRATEGY
from medforge_common.strategy import STRATEGIES, Traits
from medforge_operator import isolation
from medforge_operator.bodies import Obj
from medforge_operator.composite import branches, withdrawal
from medforge_operator.composite.inputs import evaluate_inputs, has_verified_copy, ready_for
from medforge_operator.composite.settling import Observation, in_flight

JSON = dict[str, Any]


@dataclass
class Plan:
    revision: int
    new: list[JSON]  # contributions this revision adds
    all_inputs: list[JSON]  # contributions the merge reads (new ones, or all for `full`)
    # A withdrawal's replacement: a full merge of the remaining inputs, nothing new.
    replacement: bool = False


def effective_integration(spec: JSON, registry: Mapping[str, Traits] = STRATEGIES) -> str:
    """A strategy whose composite is no sum (dense TIES and DARE updates, the subspace merges)
    cannot take new inputs into its parent revision: every revision merges all inputs afresh."""
    name = (spec.get("strategy") or {}).get("type") or DEFAULT_STRATEGY
    known = registry.get(name)
    if known is not None and not known.incremental:
        return "full"
    return str(spec.get("integration", "incremental"))


def replacement_inputs(composite: Obj, contribs: list[JSON], base_digest: str) -> list[JSON]:
    """The contributions a withdrawal's replacement merges: status.rebuild's inputs, in their
    order, that are still Ready with their verified copy for the base model (and, trained
    from a revision, still mergeable relative to it: not withdrawn with cascade)."""
    status = composite.get("status") or {}
    wanted = list((status.get("rebuild") or {}).get("inputs") or [])
    by_digest = {}
    for c in contribs:
        digest = ((c.get("status") or {}).get("artifact") or {}).get("digest")
        usable = digest in wanted and ready_for(c, base_digest) and has_verified_copy(c)
        if usable and branches.refusal(composite, c) is None:
            by_digest[digest] = c
    return [by_digest[d] for d in wanted if d in by_digest]


def plan_revision(composite: Obj, candidates: list[JSON], contribs: list[JSON]) -> Plan | None:
    """The next revision to start, if any."""
    spec, status = composite["spec"], composite.get("status") or {}
    if status.get("pendingRevision"):
        return None
    if status.get("rebuild"):
        return None  # a withdrawal's replacement goes first (next_plan)
    if spec.get("paused") or not candidates:
        return None
    current = status.get("current")
    if current is None and len(candidates) < int(spec.get("minContributions", 1)):
        return None
    if _waits(status, spec, candidates):
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


def _waits(status: JSON, spec: JSON, candidates: list[JSON]) -> bool:
    """Arrivals wait: for spec.minNewInputs hospitals (so that no revision adds one hospital's
    update alone), or, after a candidate the sites did not score by the timeout, for one
    input that candidate did not hold."""
    if status.get("isolation"):
        return False  # trials of the inputs under suspicion are not batched
    digests = {c["status"]["artifact"]["digest"] for c in candidates}
    hospitals = {c["metadata"]["namespace"] for c in candidates}
    if len(hospitals) < int(spec.get("minNewInputs", 1)):
        return True
    last = (status.get("history") or [{}])[0]
    return bool(last.get("awaiting")) and digests <= set(last["awaiting"])


def next_plan(composite: Obj, o: Observation, at: str) -> Plan | None:
    """The revision to start now (`at`), if any (`composite` carries the settled status)."""
    status = composite.get("status") or {}
    if at < str((status.get("retry") or {}).get("notBefore", "")):
        return None  # a failed revision's backoff
    # A failed revision does not block the next one (its inputs are excluded); a store that
    # cannot be reached, a refused start or an unusable base model do.
    blocked = o.start_problem or o.base_problem
    if o.base is None or blocked or in_flight(status, o) is not None:
        return None
    if status.get("rebuild"):
        # A withdrawal goes first, paused or not: the forge cannot hold a hospital in.
        if status.get("pendingRevision"):
            return None
        inputs = replacement_inputs(composite, o.contribs, o.base.digest)
        revision = int(status.get("revision") or 0) + 1
        return Plan(revision, [], inputs, replacement=True) if inputs else None
    _, candidates = evaluate_inputs(composite, o.contribs, o.base.digest, o.trust)
    return plan_revision(composite, candidates, o.contribs)


def abandoned_rebuild(composite: Obj, o: Observation, at: str) -> JSON:
    """Status fields when a withdrawal's replacement has nothing left to merge (`composite`
    carries the settled status)."""
    status = composite.get("status") or {}
    if (
        not status.get("rebuild")
        or status.get("pendingRevision")
        or o.base is None
        or o.base_problem
        or replacement_inputs(composite, o.contribs, o.base.digest)
    ):
        return {}
    return withdrawal.abandon(status, at)
