"""Institutions (cluster-scoped, the platform team's): which public keys sign for which
namespace. Pure: the status from the spec, and the trusted keys for a namespace."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from medforge_common.attestation import BadKey, TrustedKey, curve, key_id
from medforge_operator.conditions import Cond, merge_conditions

JSON = dict[str, Any]
ACTIVE = "Active"
REVOKED = "Revoked"


def key_rows(spec: JSON) -> list[JSON]:
    """Each key as the operator read it: its id and curve, or why it is unusable."""
    rows: list[JSON] = []
    for k in (spec.get("keys") or [])[:16]:
        row: JSON = {"name": str(k.get("name", "")), "state": k.get("state") or ACTIVE}
        try:
            row |= {"keyId": key_id(str(k.get("publicKey", ""))), "curve": curve(k["publicKey"])}
        except (BadKey, KeyError) as exc:
            row["error"] = f"spec.keys[{row['name']}].publicKey: {exc}"
        rows.append(row)
    return rows


def status(obj: JSON, at: str | None = None) -> JSON:
    gen = int(obj["metadata"].get("generation") or 1)
    rows = key_rows(obj.get("spec") or {})
    errors = [r["error"] for r in rows if "error" in r]
    active = sum(1 for r in rows if r["state"] == ACTIVE and "error" not in r)
    if errors:
        cond = Cond("Ready", False, "InvalidKey", "; ".join(errors)[:1000])
    elif not active:
        cond = Cond("Ready", False, "NoActiveKey", "no Active key: nothing it signs verifies")
    else:
        cond = Cond("Ready", True, "KeysValid", f"{active} active key(s)")
    # Stalled (kstatus): a key to fix, not a round to wait for, so Flux fails on it.
    stalled = Cond("Stalled", not cond.status, cond.reason, "" if cond.status else cond.message)
    old = (obj.get("status") or {}).get("conditions")
    return {
        "observedGeneration": gen,
        "activeKeys": active,
        "keys": rows,
        "conditions": merge_conditions(old, [cond, stalled], gen, at),
    }


def trusted(institutions: Iterable[JSON], namespace: str) -> list[TrustedKey]:
    """The usable Active keys that sign for `namespace`, from every Institution naming it."""
    out: list[TrustedKey] = []
    for inst in institutions:
        spec = inst.get("spec") or {}
        if spec.get("namespace") != namespace:
            continue
        for k in (spec.get("keys") or [])[:16]:
            if (k.get("state") or ACTIVE) != ACTIVE:
                continue
            try:
                pem = str(k.get("publicKey", "")).encode()
                out.append(TrustedKey(key_id(pem), pem, inst["metadata"]["name"], namespace))
            except BadKey:
                continue
    return out


def active_ids(institutions: Iterable[JSON]) -> dict[str, frozenset[str]]:
    """namespace -> the ids of its usable Active keys."""
    by_ns: dict[str, set[str]] = {}
    insts = list(institutions)
    for ns in {str((i.get("spec") or {}).get("namespace", "")) for i in insts}:
        by_ns[ns] = {k.key_id for k in trusted(insts, ns)}
    return {ns: frozenset(ids) for ns, ids in by_ns.items()}
