"""One reconcile round of an Institution (the platform team's): its keys' status, then the
contributions of its namespace whose signer was unknown are judged again (the key may have
been registered after they trained). A revoked key needs no pass here: composites read the
Active keys every round and refuse its signatures (UnknownSigner) from then on."""

from __future__ import annotations

import logging
from typing import Any

from medforge_operator import CONTRIBUTIONS, INSTITUTIONS, institution, signatures
from medforge_operator.catalog import Catalog
from medforge_operator.kubeapi import KubeApi
from medforge_operator.statuswrite import write_status
from medforge_operator.store import ForgeStore

JSON = dict[str, Any]
log = logging.getLogger("medforge.institution")


def settled(obj: JSON) -> bool:
    """Its status describes its current keys (a round since its last change)."""
    st = obj.get("status") or {}
    return bool(st.get("observedGeneration") == obj["metadata"].get("generation"))


def reconcile(
    obj: JSON, kube: KubeApi, store: ForgeStore, cat: Catalog, watched: tuple[str, ...] = ()
) -> int:
    """Write the status; returns how many contributions changed their signature verdict (only
    in a namespace the operator watches: `watched`, or every namespace when empty)."""
    old = obj.get("status") or {}
    write_status(kube, INSTITUTIONS, obj, old, institution.status(obj))
    cat.institutions.forget()
    ns = str((obj.get("spec") or {}).get("namespace", ""))
    if not ns or (watched and ns not in watched):
        return 0
    keys = cat.institutions.trusted(ns)
    changed = 0
    for c in kube.iter_objects(CONTRIBUTIONS, ns):
        if signatures.recheck(c, kube, store, keys, f"namespace {ns}'s Institution"):
            changed += 1
    return changed
