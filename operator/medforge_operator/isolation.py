"""Finding the input that breaks a revision, so that one hospital never stops the others (pure
functions over status.isolation).

A revision whose merge Job failed twice in a way its inputs can explain (not the store, an
eviction or a lost node: those are retried as faults), or that the gate rejected with several new
inputs, is split: its new inputs are tried in halves, each half as a revision of its own. A half
that merges lands (accepted or not, it proves the merge works without the other half); a half that
fails or is rejected is split again. A single input is blamed only when it failed alone twice
while some other trial of the same isolation merged: then it is excluded (IsolatedAfterFailures,
or RejectedByGate for a regression). When every trial failed, nothing singles out an input: the
isolation ends and the revision is retried as a fault, with backoff.

Bound: n new inputs take at most 2n - 1 trials (the nodes of a binary tree over them) plus one
more for each single input that fails, after the two failed attempts that started it: with one
culprit among n, 2 + 2 ceil(log2 n) + 1 merge Jobs at most."""

from __future__ import annotations

from typing import Any

from medforge_common.api import InputReason as IR

JSON = dict[str, Any]
BLAME_AFTER = 2  # failures of one input alone (and of the revision before isolating)

MERGED = "merged"  # the trial's merge succeeded (accepted)
VERDICT = "verdict"  # the merger refused every input of the trial, each with its reason
REJECTED = "rejected"  # the gate rejected the trial
FAILED = "failed"  # the Job failed in a way its inputs can explain
FAULT = "fault"  # the store, an eviction, a lost node: nothing to do with the inputs


def halves(digests: list[str]) -> list[list[str]]:
    mid = (len(digests) + 1) // 2
    return [g for g in (digests[:mid], digests[mid:]) if g]


def begin(revision: int, new: list[str], cause: str) -> JSON | None:
    """The isolation of a revision's new inputs, or None when there is nothing to split."""
    if len(new) < 2:
        return None
    return {"revision": revision, "cause": cause, "groups": halves(list(new)), "failures": {}}


def _valid(isolation: Any) -> JSON | None:
    """status.isolation as this module wrote it, or None (a status edited into another shape is
    dropped, never a crash of every round)."""
    if not isinstance(isolation, dict):
        return None
    groups = isolation.get("groups")
    failures = isolation.get("failures") or {}
    if not (
        isinstance(groups, list)
        and all(isinstance(g, list) and all(isinstance(d, str) for d in g) for g in groups)
        and isinstance(failures, dict)
        and all(type(n) is int for n in failures.values())
        and type(isolation.get("merges", 0)) is int
    ):
        return None
    return isolation


def group(isolation: Any) -> list[str] | None:
    """The new inputs of the next trial, or None outside an isolation."""
    iso = _valid(isolation)
    if not iso or not iso["groups"]:
        return None
    return list(iso["groups"][0])


def prune(isolation: Any, candidates: set[str]) -> JSON | None:
    """Without the inputs that are no candidates any more (withdrawn, retrained, excluded)."""
    iso = _valid(isolation)
    if not iso:
        return None
    groups = [[d for d in g if d in candidates] for g in iso["groups"]]
    groups = [g for g in groups if g]
    if not groups:
        return None
    failures = {d: n for d, n in (iso.get("failures") or {}).items() if d in candidates}
    return {**iso, "groups": groups, "failures": failures}


def _hopeless(groups: list[list[str]], failures: JSON) -> bool:
    """Every group left is one input that already failed alone twice."""
    return all(len(g) == 1 and int(failures.get(g[0], 0)) >= BLAME_AFTER for g in groups)


def step(isolation: Any, tried: list[str], result: str) -> tuple[JSON | None, dict[str, str]]:
    """(the isolation after a trial of `tried` ended with `result` (None when it is over),
    {digest: exclusion reason}).

    Only a trial of this isolation that merged (accepted, or rejected by the gate: the Job ran)
    proves that merging works without an input; the revision that started the isolation never
    does. So a fault that fails every merge (a broken merger image, a bug) blames nobody."""
    iso = _valid(isolation)
    if iso is None:
        return None, {}
    if result == FAULT:
        return iso, {}
    groups = [list(g) for g in iso["groups"]]
    failures = dict(iso.get("failures") or {})
    merges = int(iso.get("merges", 0)) + (result in (MERGED, REJECTED))
    rest = [g for g in groups if set(g) != set(tried)]
    excluded: dict[str, str] = {}
    if result in (MERGED, VERDICT):
        groups = rest
    elif len(tried) >= 2:  # rejected or failed: split it further
        groups = halves(tried) + rest
    elif result == REJECTED:
        excluded[tried[0]] = IR.REJECTED_BY_GATE
        groups = rest
    else:
        d = tried[0]
        failures[d] = int(failures.get(d, 0)) + 1
        if failures[d] < BLAME_AFTER:
            # Once more alone: at once when another trial has merged, else after the others
            # (one of which may merge and prove that the merge works without it).
            groups = [tried, *rest] if merges else [*rest, tried]
        elif merges:
            excluded[d] = IR.ISOLATED_AFTER_FAILURES
            failures.pop(d)
            groups = rest
        elif _hopeless([tried, *rest], failures):
            return None, {}  # every trial failed: no input explains it, a fault
        else:
            groups = [*rest, tried]  # tried again once another trial has merged
    if not groups:
        return None, excluded
    return {**iso, "groups": groups, "failures": failures, "merges": merges}, excluded
