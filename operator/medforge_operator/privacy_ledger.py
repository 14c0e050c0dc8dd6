"""The privacy ledger (pure functions): whether a contribution may train on a dataset that a
PrivacyBudget covers, and the budget's status once its epsilon is reserved.

Composition is sequential: the runs' epsilons add up, and so do their deltas. It is the
conservative bound, it needs no accountant in the operator's image (which has no torch), and it
is exact about what the operator knows: the (epsilon, delta) it granted each run. A tighter
composition (PRV over the runs' noise multipliers and sample rates) would have to trust the
trainers' manifests, which tenants can write."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from medforge_common.api import Reason as R

JSON = dict[str, Any]
REFUSALS_KEPT = 20
SLACK = 1e-12  # float sums of granted figures


def dataset_key(uri: str) -> str:
    """A dataset URI as budgets and contributions are matched on (trailing slashes aside)."""
    return uri.strip().rstrip("/")


def covering(budgets: list[JSON], uri: str) -> list[JSON]:
    """The budgets of the contribution's namespace that name its dataset."""
    key = dataset_key(uri)
    return [
        b
        for b in budgets
        if dataset_key(str(((b.get("spec") or {}).get("dataset") or {}).get("uri", ""))) == key
    ]


def _entries(budget: JSON) -> list[JSON]:
    return [e for e in (budget.get("status") or {}).get("entries") or [] if isinstance(e, dict)]


def spent(budget: JSON) -> tuple[float, float]:
    """(epsilon, delta) reserved so far."""
    entries = _entries(budget)
    return (
        sum(float(e.get("epsilon") or 0) for e in entries),
        sum(float(e.get("delta") or 0) for e in entries),
    )


def _ident(c: Mapping[str, Any]) -> tuple[str, int]:
    return str(c["metadata"]["uid"]), int(c["metadata"]["generation"])


def reserved(budget: JSON, c: Mapping[str, Any]) -> bool:
    uid, gen = _ident(c)
    return any(e.get("uid") == uid and e.get("generation") == gen for e in _entries(budget))


@dataclass
class Admission:
    """A verdict on one contribution: admitted (with the grant to record on it and the budgets
    to write), or refused (a reason and a message that says what to do)."""

    admitted: bool
    grant: JSON | None = None
    reserve: list[tuple[JSON, JSON]] = field(default_factory=list)  # (budget, its new status)
    refusal: tuple[str, str] | None = None


def budget_status(budget: JSON, entries: list[JSON], refused: list[JSON]) -> JSON:
    spec = budget.get("spec") or {}
    eps = sum(float(e.get("epsilon") or 0) for e in entries)
    dlt = sum(float(e.get("delta") or 0) for e in entries)
    return {
        "observedGeneration": budget["metadata"].get("generation"),
        "spent": {"epsilon": round(eps, 9), "delta": dlt},
        "remaining": {
            "epsilon": round(max(0.0, float(spec.get("epsilon", 0)) - eps), 9),
            "delta": max(0.0, float(spec.get("delta", 0)) - dlt),
        },
        "entries": entries,
        **({"refused": refused[:REFUSALS_KEPT]} if refused else {}),
    }


def _refusals(
    budgets: list[JSON], c: Mapping[str, Any], epsilon: float | None, at: str
) -> list[tuple[JSON, JSON]]:
    """The budgets' statuses with this refusal first; none when it is already the newest (a
    refused contribution is looked at again every resync)."""
    out = []
    for b in budgets:
        old = (b.get("status") or {}).get("refused") or []
        entry = {"contribution": c["metadata"]["name"], "epsilon": epsilon, "at": at}
        newest = old[0] if old and isinstance(old[0], dict) else {}
        if newest.get("contribution") == entry["contribution"] and newest.get("epsilon") == epsilon:
            continue
        out.append((b, budget_status(b, _entries(b), [entry, *old])))
    return out


def _exceeded(b: JSON, eps: float, dlt: float, uri: str) -> tuple[str, str]:
    total = b.get("spec") or {}
    used_eps, used_delta = spent(b)
    left = max(0.0, float(total.get("epsilon", 0)) - used_eps)
    left_delta = max(0.0, float(total.get("delta", 0)) - used_delta)
    return (
        R.PRIVACY_BUDGET_EXCEEDED,
        f"spec.privacy asks for epsilon {eps:g} (delta {dlt:g}) on {uri}, but PrivacyBudget "
        f"{b['metadata']['name']} has epsilon {left:g} (delta {left_delta:g}) left of "
        f"{total.get('epsilon')}: lower spec.privacy, or ask your data-protection officer",
    )


def admit(c: Mapping[str, Any], budgets: list[JSON], at: str) -> Admission:
    """May this generation of the contribution train? Budgets are those of its namespace."""
    spec = c.get("spec") or {}
    privacy = spec.get("privacy")
    uri = str((spec.get("dataset") or {}).get("uri", ""))
    mine = covering(budgets, uri)
    uid, gen = _ident(c)
    if not privacy:
        if not mine:
            return Admission(True)
        names = ", ".join(sorted(b["metadata"]["name"] for b in mine))
        return Admission(
            False,
            reserve=_refusals(mine, c, None, at),
            refusal=(
                R.PRIVACY_REQUIRED,
                f"dataset {uri} is under PrivacyBudget {names}: set spec.privacy (epsilon, "
                "delta) to train on it with differential privacy",
            ),
        )
    eps, dlt = float(privacy["epsilon"]), float(privacy["delta"])
    grant: JSON = {
        "epsilon": eps,
        "delta": dlt,
        "generation": gen,
        "budgets": sorted(b["metadata"]["name"] for b in mine),
        "grantedAt": at,
    }
    reserve = []
    for b in mine:
        if reserved(b, c):
            continue
        total = b.get("spec") or {}
        used_eps, used_delta = spent(b)
        if used_eps + eps > float(total.get("epsilon", 0)) + SLACK or (
            used_delta + dlt > float(total.get("delta", 0)) + SLACK
        ):
            return Admission(
                False, reserve=_refusals([b], c, eps, at), refusal=_exceeded(b, eps, dlt, uri)
            )
        entry = {
            "contribution": c["metadata"]["name"],
            "uid": uid,
            "generation": gen,
            "epsilon": eps,
            "delta": dlt,
            "at": at,
        }
        refused = (b.get("status") or {}).get("refused") or []
        reserve.append((b, budget_status(b, [*_entries(b), entry], refused)))
    return Admission(True, grant=grant, reserve=reserve)
