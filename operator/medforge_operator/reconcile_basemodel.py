"""One reconcile round of a BaseModel: verify its manifest and every file once per generation,
then write the status computed by `basemodel.compute_status`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from medforge_common.api import BaseModelPhase, ConditionType, Reason
from medforge_common.artifacts import MANIFEST_FILE
from medforge_common.attestation import (
    MAX_REVISION_SIGNATURE_BYTES,
    SIGNATURE_FILE,
    VERIFIED,
    BadKey,
    TrustedKey,
    key_id,
)
from medforge_common.attestation import Reason as SignatureReason
from medforge_common.manifest import Manifest
from medforge_common.uris import S3Uri
from medforge_operator import BASEMODELS, basemodel, conditions, metrics, signatures
from medforge_operator.bodies import BaseModelBody, Obj
from medforge_operator.kubeapi import KubeApi
from medforge_operator.statuswrite import write_status
from medforge_operator.store import ForgeStore, ObjectMissing, StoreUnreachable, VerificationFailed

JSON = dict[str, Any]
EventFn = Callable[[Obj, str, str, str], None]


def reconcile(obj: BaseModelBody, kube: KubeApi, store: ForgeStore, event: EventFn) -> JSON:
    """Returns the status written (or the unchanged one)."""
    old = obj.get("status") or {}
    if basemodel.settled(obj):
        return old
    gen = int(obj["metadata"]["generation"])
    prefix = basemodel.store_prefix(store.bucket, obj)
    o = basemodel.Observation(generation=gen, uri=str(prefix))
    try:
        digest = store.manifest_digest(prefix)
        manifest = store.verify_artifact(prefix, (obj.get("spec") or {}).get("digest") or digest)
        signature = _signature(obj, store, prefix, manifest, digest)
        if signature is not None and signature["state"] != VERIFIED:
            o.invalid_reason = signature["state"]
            raise VerificationFailed(f"spec.publicKey: {signature['message']}")
        metrics.verified("basemodel", sum(f.size for f in manifest.files))
        o.verified = {
            "digest": digest,
            "sizeBytes": sum(f.size for f in manifest.files),
            "files": [f.name for f in manifest.files],
        }
        if signature is not None:
            o.verified["signature"] = {k: signature[k] for k in ("state", "keyId")}
    except StoreUnreachable as exc:
        o.store_error = str(exc)
    except VerificationFailed as exc:
        if isinstance(exc, ObjectMissing) and exc.uri.key.rsplit("/", 1)[-1] == MANIFEST_FILE:
            o.missing = str(exc)
        else:
            o.invalid = str(exc)
            metrics.verification_failed("basemodel", o.invalid_reason or Reason.VERIFICATION_FAILED)
    new = basemodel.compute_status(old, o)
    if write_status(kube, BASEMODELS, obj, old, new) and old.get("phase") != new.get("phase"):
        ready = conditions.get(new["conditions"], ConditionType.READY) or {}
        kind = "Normal" if new["phase"] != BaseModelPhase.FAILED else "Warning"
        event(obj, kind, ready["reason"], ready["message"])
    return new


def _signature(
    obj: Obj, store: ForgeStore, prefix: S3Uri, manifest: Manifest, digest: str
) -> JSON | None:
    """The verdict on the model's bundle, for a BaseModel that names its signer's key."""
    pem = str((obj.get("spec") or {}).get("publicKey") or "")
    if not pem:
        return None
    try:
        key = TrustedKey(key_id(pem), pem.encode(), obj["metadata"]["name"], "")
    except BadKey as exc:
        return {"state": SignatureReason.INVALID, "message": f"not a usable key ({exc})"}
    try:
        raw = store.read(prefix.join(SIGNATURE_FILE), MAX_REVISION_SIGNATURE_BYTES)
    except ObjectMissing:
        return {
            "state": SignatureReason.UNSIGNED,
            "message": f"no {SIGNATURE_FILE} beside the manifest",
        }
    return signatures.judge(raw, manifest, digest, [key], "spec.publicKey")
