"""Erasing a withdrawn input from the forge store: the revisions of this composite that held it
and, once it has left every composite, the contribution's own files (its uploads and the
operator's verified copies, every object version). What was deleted is recorded in a receipt in
the store and told to the hospital as an Event in its namespace: names and digests only."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from medforge_common.api import EventReason
from medforge_common.api import WithdrawalReason as WR
from medforge_common.uris import S3Uri
from medforge_operator import CONTRIBUTIONS, contribution, signing
from medforge_operator.bodies import Obj
from medforge_operator.composite import inputs, withdrawal
from medforge_operator.kubeapi import KubeApi
from medforge_operator.store import ForgeStore

JSON = dict[str, Any]
EventFn = Callable[[Obj, str, str, str], None]
RECEIPTS = "receipts/"


def contribution_prefixes(bucket: str, namespace: str, name: str) -> list[S3Uri]:
    """Every upload and verified copy of a contribution of that name (all uids, generations
    and digests): a deleted contribution leaves nothing under its name."""
    return [
        S3Uri(bucket, f"contributions/{namespace}/{name}/"),
        S3Uri(bucket, f"{signing.VERIFIED}contributions/{namespace}/{name}/"),
    ]


def revision_prefixes(bucket: str, composite: Obj, revisions: list[int]) -> list[S3Uri]:
    meta = composite["metadata"]
    out = []
    for n in revisions:
        ident = (bucket, meta["namespace"], meta["name"], meta["uid"], n)
        out += [signing.revision_output(*ident), signing.verified_revision(*ident)]
    return out


def leaves_store(live: JSON | None, me: str) -> bool:
    """Whether the contribution's own files go: it is deleted, or it shares with no composite
    but this one (one still shared elsewhere keeps them until it leaves the last)."""
    if live is None:
        return True
    forges = ((live.get("spec") or {}).get("sharing") or {}).get("forges") or []
    return not any(f != me for f in forges)


def receipt_key(composite: Obj, record: JSON) -> str:
    """Deterministic, so that an erasure interrupted and done again writes the same receipt."""
    meta = composite["metadata"]
    when = str(record.get("at", "")).replace(":", "").replace("-", "")
    digest = str(record.get("digest", "")).removeprefix("sha256:")[:16]
    return (
        f"{RECEIPTS}{meta['namespace']}/{meta['name']}/{meta['uid']}/"
        f"{when}-{record.get('namespace')}-{record.get('name')}-{digest}.json"
    )


def erase(
    composite: Obj,
    record: JSON,
    kube: KubeApi,
    store: ForgeStore,
    event: EventFn,
    at: str,
) -> JSON:
    """Delete what the withdrawal `record` allows, write the receipt and tell the hospital;
    the status fields that record it. StoreUnreachable leaves the record as it was (the next
    round erases again: deleting is idempotent)."""
    meta = composite["metadata"]
    me = f"{meta['namespace']}/{meta['name']}"
    ns, name = str(record["namespace"]), str(record["name"])
    status = composite.get("status") or {}
    serving = int((status.get("current") or {}).get("revision") or 0)
    revisions = [int(n) for n in record.get("revisions") or [] if int(n) != serving]
    live = kube.get_object(CONTRIBUTIONS, ns, name)
    prefixes = revision_prefixes(store.bucket, composite, revisions)
    own = leaves_store(live, me)
    if own:
        prefixes += contribution_prefixes(store.bucket, ns, name)
    deleted = [key for p in prefixes for key in store.erase(p)]
    key = receipt_key(composite, record)
    receipt = {
        "kind": "medforge.io/ErasureReceipt",
        "composite": me,
        "input": {"namespace": ns, "name": name, "digest": record.get("digest")},
        "reason": record.get("reason"),
        "withdrawnAt": record.get("at"),
        "erasedAt": at,
        "revisions": revisions,
        "revisionDigests": {
            str(e["revision"]): e["digest"]
            for e in status.get("history") or []
            if e.get("revision") in revisions and e.get("digest")
        },
        "contributionFiles": "erased" if own else "kept: still shared with another composite",
        "deleted": deleted,
    }
    store.write_json(store.uri(key), receipt)
    target = live or {
        "apiVersion": "medforge.io/v1alpha1",
        "kind": "LoRAContribution",
        "metadata": {"namespace": ns, "name": name},
    }
    kept = "" if own else "; its own files are kept while it is shared with another composite"
    event(
        target,
        "Normal",
        EventReason.ERASED,
        f"{me}: withdrawal carried out; {len(deleted)} file(s) of revisions "
        f"{revisions or 'none'} erased{kept}; receipt s3://{store.bucket}/{key}",
    )
    if live is not None:
        _record_on_contribution(live, me, record, at, kube)
    return withdrawal.erased(status, record, at, key, len(deleted))


def _record_on_contribution(live: JSON, me: str, record: JSON, at: str, kube: KubeApi) -> None:
    """status.usedBy of a contribution that still exists shows the withdrawal carried out."""
    used = [u for u in (live.get("status") or {}).get("usedBy") or [] if u.get("composite") != me]
    entry = {
        "composite": me,
        "withdrawnAt": record.get("at"),
        "reason": record.get("reason"),
        "erasedAt": at,
        **({"replacedBy": record["replacement"]} if record.get("replacement") else {}),
    }
    kube.patch_status(
        CONTRIBUTIONS,
        str(live["metadata"]["namespace"]),
        str(live["metadata"]["name"]),
        {"usedBy": [entry, *used][: contribution.USED_BY_LIMIT]},
    )


def departure_reason(live: JSON | None, me: str) -> str:
    """Why an input that left did: deleted, consent withdrawn, or no longer selected."""
    if live is None:
        return WR.CONTRIBUTION_DELETED
    return WR.NO_LONGER_SELECTED if inputs.shares_with(live, me) else WR.CONSENT_WITHDRAWN
