"""metav1.Condition bookkeeping, kstatus style: lastTransitionTime moves only on a flip."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from medforge_common.api import ConditionType

JSON = dict[str, Any]


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_now(at: str) -> dt.datetime:
    """A time as `now` writes it."""
    return dt.datetime.strptime(at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class Cond:
    type: str
    status: bool | None  # None for Unknown
    reason: str
    message: str = ""


def _status_word(status: bool | None) -> str:
    return "Unknown" if status is None else ("True" if status else "False")


def merge_conditions(
    old: list[JSON] | None, new: list[Cond], generation: int, at: str | None = None
) -> list[JSON]:
    """The new condition list: the same order as `new`, keeping each condition's
    lastTransitionTime when its status did not change."""
    previous = {c.get("type"): c for c in old or []}
    stamp = at or now()
    out = []
    for c in new:
        word = _status_word(c.status)
        prev = previous.get(c.type)
        since = prev["lastTransitionTime"] if prev and prev.get("status") == word else stamp
        out.append(
            {
                "type": c.type,
                "status": word,
                "reason": c.reason,
                "message": c.message[:32768],
                "observedGeneration": generation,
                "lastTransitionTime": since,
            }
        )
    return out


def get(conditions: list[JSON] | None, ctype: str) -> JSON | None:
    return next((c for c in conditions or [] if c.get("type") == ctype), None)


def is_true(conditions: list[JSON] | None, ctype: str) -> bool:
    c = get(conditions, ctype)
    return bool(c and c.get("status") == "True")


# cluster-api style helpers: a condition by its truth, and the kstatus trio (Ready,
# Reconciling, Stalled) that every kind reports, in the three shapes it takes.
def mark_true(ctype: str, reason: str, message: str = "") -> Cond:
    return Cond(ctype, True, reason, message)


def mark_false(ctype: str, reason: str, message: str = "") -> Cond:
    return Cond(ctype, False, reason, message)


def mark_unknown(ctype: str, reason: str, message: str = "") -> Cond:
    return Cond(ctype, None, reason, message)


def steady(
    reason: str, message: str = "", ready: bool = True, quiet: str | None = None
) -> list[Cond]:
    """Nothing in progress and nothing stuck (kstatus Current when Ready): Reconciling and
    Stalled False, with `quiet` (else `reason`) as their reason."""
    return [
        Cond(ConditionType.READY, ready, reason, message),
        mark_false(ConditionType.RECONCILING, quiet or reason),
        mark_false(ConditionType.STALLED, quiet or reason),
    ]


def progressing(
    reason: str, message: str, ready: bool = False, ready_reason: str = ""
) -> list[Cond]:
    """Work in progress (kstatus InProgress); Ready may stay True while a served state holds."""
    return [
        Cond(ConditionType.READY, ready, ready_reason or reason, message),
        mark_true(ConditionType.RECONCILING, reason, message),
        mark_false(ConditionType.STALLED, reason),
    ]


def stalled(reason: str, message: str) -> list[Cond]:
    """A verdict the user must act on (kstatus Failed): Ready False, Stalled True."""
    return [
        mark_false(ConditionType.READY, reason, message),
        mark_false(ConditionType.RECONCILING, reason),
        mark_true(ConditionType.STALLED, reason, message),
    ]
