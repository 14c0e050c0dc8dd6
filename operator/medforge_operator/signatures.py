"""The operator's check of who signed an upload: the bundle beside a contribution's files is
copied into the verified prefix with them, then checked against the Active keys that the
Institutions register for the contribution's namespace, and its file digests against the
manifest's (whose every file the operator hashed itself). A verdict is recorded in
status.artifact.signature; only a composite with spec.requireSignatures acts on it."""

from __future__ import annotations

import logging
from typing import Any

from medforge_common.artifacts import MANIFEST_FILE
from medforge_common.attestation import (
    MAX_SIGNATURE_BYTES,
    MODEL_PREDICATE,
    SIGNATURE_FILE,
    VERIFIED,
    Reason,
    SignatureProblem,
    TrustedKey,
    check_files,
    open_bundle,
)
from medforge_common.manifest import Manifest, ManifestError, digest_of
from medforge_common.uris import S3Uri
from medforge_operator import CONTRIBUTIONS, metrics
from medforge_operator.kubeapi import KubeApi
from medforge_operator.store import ForgeStore, ObjectMissing, StoreUnreachable, VerificationFailed

JSON = dict[str, Any]
log = logging.getLogger("medforge.signatures")


def judge(
    raw: bytes,
    manifest: Manifest,
    digest: str,
    keys: list[TrustedKey],
    who: str,
    predicate: str = MODEL_PREDICATE,
) -> JSON:
    """status.artifact.signature for a bundle over an artifact whose manifest has `digest`
    (a contribution's model signature, or the forge's revision statement)."""
    try:
        signed = open_bundle(raw, keys, who)
        if signed.statement.get("predicateType") != predicate:
            raise SignatureProblem(Reason.INVALID, f"the statement is not a {predicate}")
        files = {f.name: f.sha256 for f in manifest.files}
        check_files(signed.statement, {**files, MANIFEST_FILE: digest.removeprefix("sha256:")})
    except SignatureProblem as exc:
        return {"state": exc.reason, "message": str(exc)[:500]}
    return {
        "state": VERIFIED,
        "institution": signed.key.institution,
        "keyId": signed.key.key_id,
        "digest": digest_of(raw),
    }


def artifact_signature(
    store: ForgeStore,
    upload: S3Uri,
    verified: S3Uri,
    manifest: Manifest,
    digest: str,
    keys: list[TrustedKey],
    who: str,
    predicate: str = MODEL_PREDICATE,
) -> JSON:
    """Copy the uploaded bundle beside the verified files and judge the copy. A store fault
    raises StoreUnreachable (retried); a missing bundle is Unsigned."""
    try:
        store.copy(upload.join(SIGNATURE_FILE), verified.join(SIGNATURE_FILE), MAX_SIGNATURE_BYTES)
        raw = store.read(verified.join(SIGNATURE_FILE), MAX_SIGNATURE_BYTES)
    except ObjectMissing:
        return {"state": Reason.UNSIGNED, "message": "no signature was uploaded"}
    except VerificationFailed as exc:
        verdict = {"state": Reason.INVALID, "message": str(exc)[:500]}
    else:
        verdict = judge(raw, manifest, digest, keys, who, predicate)
    if verdict["state"] == Reason.INVALID:  # bytes that are not what their signer signed
        kind = "contribution" if predicate == MODEL_PREDICATE else "composite"
        metrics.verification_failed(kind, Reason.INVALID)
    return verdict


def recheck(obj: JSON, kube: KubeApi, store: ForgeStore, keys: list[TrustedKey], who: str) -> bool:
    """A contribution whose signer was unknown is judged again from its verified copy once its
    namespace's Institution changes (registered after it trained, say). Whether it changed."""
    art = (obj.get("status") or {}).get("artifact") or {}
    sig = art.get("signature") or {}
    if sig.get("state") != Reason.UNKNOWN_SIGNER or not str(art.get("uri", "")).startswith("s3://"):
        return False
    bucket, _, key = str(art["uri"]).removeprefix("s3://").partition("/")
    prefix = S3Uri(bucket, key)
    try:
        raw_manifest = store.read(prefix.join(MANIFEST_FILE))
        if digest_of(raw_manifest) != art.get("digest"):
            return False
        manifest = Manifest.from_json(raw_manifest.decode())
        raw = store.read(prefix.join(SIGNATURE_FILE), MAX_SIGNATURE_BYTES)
    except (StoreUnreachable, VerificationFailed, ManifestError, UnicodeDecodeError) as exc:
        log.warning("%s: signature not checked again: %s", who, exc)
        return False
    new = judge(raw, manifest, str(art["digest"]), keys, who)
    if new.get("state") == Reason.UNKNOWN_SIGNER:
        return False  # still nobody's key: nothing to write
    meta = obj["metadata"]
    patch = {**dict.fromkeys(sig), **new}  # a merge patch: keys the new verdict drops go
    kube.patch_status(
        CONTRIBUTIONS, meta["namespace"], meta["name"], {"artifact": {"signature": patch}}
    )
    return True
