"""Which contributions a CompositeModel reads: its selectors, the hospitals' consent
(spec.sharing), and each candidate's state and reason."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from medforge_common.api import ConditionType as C
from medforge_common.api import ContributionPhase
from medforge_common.api import InputReason as IR
from medforge_common.api import InputState as IS
from medforge_common.attestation import VERIFIED
from medforge_operator import contribution
from medforge_operator.bodies import Obj
from medforge_operator.composite import branches
from medforge_operator.conditions import get as get_condition
from medforge_operator.conditions import is_true

JSON = dict[str, Any]
Trust = Mapping[str, frozenset[str]]


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


def ready_for(c: JSON, base_digest: str) -> bool:
    """Ready for its current generation, with an artifact trained for this base model."""
    st = c.get("status") or {}
    return (
        is_true(st.get("conditions"), C.READY)
        and st.get("observedGeneration") == c["metadata"].get("generation")
        and (st.get("artifact") or {}).get("baseModelDigest") == base_digest
    )


def granted_privacy(c: JSON) -> JSON | None:
    """(epsilon, delta) the operator's ledger granted the generation that made the artifact
    (status.privacy, written by the operator at admission), or None for a run without DP."""
    st = c.get("status") or {}
    grant = st.get("privacy")
    if not isinstance(grant, dict) or grant.get("generation") != st.get("observedGeneration"):
        return None
    return {k: grant[k] for k in ("epsilon", "delta") if k in grant}


def unsigned(c: JSON, trust: Trust) -> str | None:
    """Why spec.requireSignatures refuses a contribution: the operator's verdict on its
    signature (status.artifact.signature), or a signer whose key is not (or no longer) Active
    for its namespace (`trust`: namespace to Active key ids, read this round)."""
    art = c["status"].get("artifact") or {}
    sig = art.get("signature") or {}
    state = sig.get("state")
    if state != VERIFIED:
        known = {IR.SIGNATURE_INVALID.value, IR.UNKNOWN_SIGNER.value}
        return IR(state) if state in known else IR.UNSIGNED
    if sig.get("keyId") not in trust.get(c["metadata"]["namespace"], frozenset()):
        return IR.UNKNOWN_SIGNER
    return None


def _refused(composite: Obj, c: JSON, base_digest: str, trust: Trust) -> str | None:
    """A verdict on a Ready contribution: trained for another base model, from a revision this
    composite cannot merge it relative to (composite.branches), with a privacy guarantee
    weaker than the composite requires (spec.privacy.maxEpsilon), or without a signature it
    requires (spec.requireSignatures)."""
    if (c["status"].get("artifact") or {}).get("baseModelDigest") != base_digest:
        return IR.BASE_MODEL_MISMATCH
    if (why := branches.refusal(composite, c)) is not None:
        return why
    if (composite.get("spec") or {}).get("requireSignatures") and (why := unsigned(c, trust)):
        return why
    most = ((composite.get("spec") or {}).get("privacy") or {}).get("maxEpsilon")
    if most is not None:
        grant = granted_privacy(c)
        if grant is None or float(grant.get("epsilon", float("inf"))) > float(most):
            return IR.PRIVACY_BUDGET_TOO_LARGE
    return None


def merging(pending: JSON) -> set[str]:
    """The digests a pending revision merges anew (a withdrawal's replacement: all it reads)."""
    if pending.get("replacement"):
        return set(pending.get("inputs") or [])
    return set(pending.get("digests") or [])


def evaluate_inputs(
    composite: Obj, contribs: list[JSON], base_digest: str | None, trust: Trust | None = None
) -> tuple[list[JSON], list[JSON]]:
    """(status.inputs, candidates): every contribution shared with this composite, with its
    state and a reason code (never another hospital's messages or URIs), and the Ready ones
    not merged yet, in the order they became Ready (the MedForge arrival order). Without a
    usable base model (None) nothing is a candidate. An input already merged stays merged when
    its key is revoked later: revocation refuses new merges, it does not rewrite history."""
    status = composite.get("status") or {}
    current = status.get("current") or {}
    merged = {i["digest"]: i for i in current.get("inputs") or []}
    excluded: dict[str, str] = status.get("excluded") or {}
    pending = status.get("pendingRevision") or {}
    in_flight = merging(pending)
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
        elif (refused := _refused(composite, c, base_digest, trust or {})) is not None:
            entry |= {"state": IS.EXCLUDED, "reason": refused}
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
