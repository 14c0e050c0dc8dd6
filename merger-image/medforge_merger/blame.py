"""Who a regression is due to. When the candidate regresses at least `gate.corroboration` tasks
significantly and several new inputs arrived together, each new input is left out once (at most
MAX_BLAME_MERGES extra merges): the one whose absence clears the most tasks (at least
`corroboration` of them) is excluded. Inputs merged before are never blamed for a
newcomer's regression. A single new input, or more than the bound, is left to the operator's
gate (which rejects the revision, or splits its new inputs in halves)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from medforge_common import gate

JSON = dict[str, Any]


def leave_one_out(
    previous: Any,
    rule: gate.Rule,
    entries: list[JSON],
    metrics: JSON,
    metrics_without: Callable[[JSON], JSON],
) -> dict[str, list[str]]:
    """{digest: the tasks its arrival regresses} for the new inputs to exclude; `entries` are
    the result entries of the inputs merged, `metrics_without(entry)` scores a merge of all but
    that one."""
    bad = gate.regressed(previous, metrics, rule)
    new = [e for e in entries if e.get("new", True)]
    if len(bad) < rule.corroboration or not 2 <= len(new) <= gate.MAX_BLAME_MERGES:
        return {}
    # The one whose absence clears the most tasks (the later arrival on a tie): excluding every
    # input whose absence clears the regression would let a member just under the threshold
    # take a newcomer down with it. What remains is checked again by the operator's gate.
    best: tuple[int, int, str, list[str]] | None = None
    for i, e in enumerate(new):
        cleared = bad - gate.regressed(previous, metrics_without(e), rule)
        if len(cleared) >= rule.corroboration and (best is None or (len(cleared), i) > best[:2]):
            best = (len(cleared), i, e["digest"], sorted(cleared))
    return {best[2]: best[3]} if best else {}
