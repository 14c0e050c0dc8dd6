"""The operator's own check of a contribution's upload: the digest its Job announced, each file against the manifest, the verified copy that composites read, and its status."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from medforge_common.api import Reason
from medforge_common.artifacts import DISTILLED_FILE
from medforge_common.attestation import TrustedKey
from medforge_common.manifest import Manifest
from medforge_operator import (
    CONTRIBUTIONS,
    contribution,
    jobs,
    metrics,
    signatures,
)
from medforge_operator.bodies import Obj
from medforge_operator.kubeapi import KubeApi
from medforge_operator.store import (
    ForgeStore,
    InvalidManifest,
    StoreUnreachable,
    VerificationFailed,
)

JSON = dict[str, Any]
log = logging.getLogger("medforge.contribution")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
MAX_TARGET_MODULES = 64  # as the CRD bounds spec.lora.targetModules


def _announced_digest(o: contribution.Observation, store: ForgeStore, prefix: Any) -> str | None:
    """The manifest digest the Job's result announces (from the store's manifest when its pods
    are gone), or None with the verdict or fault in the observation."""
    result = contribution.success_result(o.pods)
    if not o.pods:
        # The pods are gone (pod GC, a node scaled down): the artifact is still in the store,
        # and its manifest (checked file by file afterwards) says what the result said.
        try:
            result = {"artifact": {"digest": store.manifest_digest(prefix)}}
        except StoreUnreachable as exc:
            o.verify_error = (Reason.STORE_UNREACHABLE, str(exc))
            return None
        except VerificationFailed:
            result = None
    if result is None:
        o.verify_error = (
            Reason.NO_RESULT,
            "the training Job succeeded but wrote no result JSON to its termination message",
        )
        return None
    try:
        return contribution.announced_digest(result)
    except contribution.InvalidResult as exc:
        metrics.verification_failed("contribution", Reason.INVALID_RESULT)
        o.verify_error = (Reason.INVALID_RESULT, f"the training Job's result: {exc}")
        return None


def verify(
    obj: Obj,
    o: contribution.Observation,
    store: ForgeStore,
    trusted: Callable[[str], list[TrustedKey]],
) -> None:
    """Copy the upload into the operator's verified prefix and check the copy against the
    manifest before the contribution becomes Ready, then its signature against the keys
    `trusted` gives for its namespace. The termination message (the tenant's to write) only
    announces a digest: it is parsed as untrusted input."""
    spec = obj["spec"]
    prefix = contribution.output_prefix(store.bucket, obj, o.generation)
    digest = _announced_digest(o, store, prefix)
    if digest is None:
        return
    verified = contribution.verified_prefix(store.bucket, obj, digest)
    try:
        manifest = store.verify_copy(prefix, verified, digest)
    except StoreUnreachable as exc:
        o.verify_error = (Reason.STORE_UNREACHABLE, jobs.redact_urls(str(exc)))
        return
    except VerificationFailed as exc:
        bad = (
            Reason.INVALID_MANIFEST if isinstance(exc, InvalidManifest) else Reason.DIGEST_MISMATCH
        )
        metrics.verification_failed("contribution", bad)
        o.verify_error = (bad, jobs.redact_urls(str(exc)))
        return
    if (problem := _manifest_problem(spec, o, manifest)) is not None:
        metrics.verification_failed("contribution", problem[0])
        o.verify_error = problem
        return
    ns = obj["metadata"]["namespace"]
    who = f"namespace {ns}'s Institution"
    try:
        signature = signatures.artifact_signature(
            store, prefix, verified, manifest, digest, trusted(ns), who
        )
    except StoreUnreachable as exc:
        o.verify_error = (Reason.STORE_UNREACHABLE, jobs.redact_urls(str(exc)))
        return
    metrics.verified("contribution", sum(f.size for f in manifest.files))
    o.verified = {
        "artifact": {
            **artifact_status(obj, verified, digest, manifest, (o.record or {}).get("parent")),
            "signature": signature,
        },
        "metrics": contribution.validation_metrics(manifest.meta.get("metrics")),
        "training": contribution.training_figures(manifest.meta.get("training")),
    }


def _manifest_problem(
    spec: JSON, o: contribution.Observation, manifest: Manifest
) -> tuple[str, str] | None:
    """(reason, message) when the verified manifest is not for the base model, task and
    parent revision the Job was given."""
    expected_base = ((o.record or {}).get("baseModel") or {}).get("digest", "")
    if manifest.base_model_digest != expected_base:
        return (
            Reason.BASE_MODEL_MISMATCH,
            f"the adapter was trained for base model "
            f"{manifest.base_model_digest[:19]}..., not BaseModel "
            f"{spec['baseModel']['name']}'s {expected_base[:19]}...",
        )
    mismatch = contribution.manifest_matches_spec(
        manifest.meta, spec, [f.name for f in manifest.files], (o.record or {}).get("parent")
    )
    if mismatch is not None:
        return Reason.INVALID_MANIFEST, f"manifest.json: {mismatch}"
    return None


def artifact_status(
    obj: Obj, verified: Any, digest: str, manifest: Manifest, parent: JSON | None = None
) -> JSON:
    """status.artifact: where the verified copy lies and what it holds, from the manifest;
    `parent`: the revision the operator gave the Job (spec.startFrom), which the manifest
    was checked to name."""
    spec, meta = obj["spec"], manifest.meta
    lora = spec.get("lora") or {}
    rank = meta.get("rank")
    modules = meta.get("targetModules")
    artifact: JSON = {
        "uri": str(verified),
        "digest": digest,
        "sizeBytes": sum(f.size for f in manifest.files),
        "files": [f.name for f in manifest.files],
        "rank": rank if isinstance(rank, int) and not isinstance(rank, bool) else lora.get("rank"),
        "targetModules": modules
        if isinstance(modules, list)
        and len(modules) <= MAX_TARGET_MODULES
        and all(isinstance(m, str) and len(m) <= 256 for m in modules)
        else lora.get("targetModules"),
        "baseModelDigest": manifest.base_model_digest,
        "task": spec["task"]["name"],
        "parent": dict(parent) if parent else None,
    }
    if DISTILLED_FILE in artifact["files"]:
        d = next(f for f in manifest.files if f.name == DISTILLED_FILE)
        artifact["distilled"] = {
            "uri": str(verified.join(d.name)),
            "digest": "sha256:" + d.sha256,
        }
    return {k: v for k, v in artifact.items() if v is not None}


def keep_verified(obj: Obj, kube: KubeApi, store: ForgeStore, old: JSON) -> JSON:
    """A contribution verified before the operator kept its own copies (status.artifact.uri
    under the upload prefix) is copied and checked again once, so that every reader reads a
    verified copy; one already there is left as it is."""
    art = old.get("artifact") or {}
    digest = str(art.get("digest", ""))
    if not _DIGEST.match(digest):
        return old
    verified = contribution.verified_prefix(store.bucket, obj, digest)
    if art.get("uri") == str(verified):
        return old
    upload = contribution.output_prefix(store.bucket, obj, int(old["observedGeneration"]))
    try:
        manifest = store.verify_copy(upload, verified, digest)
    except (StoreUnreachable, VerificationFailed) as exc:
        log.warning(
            "%s/%s: keeping its verified copy failed: %s",
            obj["metadata"]["namespace"],
            obj["metadata"]["name"],
            jobs.redact_urls(str(exc)),
        )
        return old
    new = {**old, "artifact": {**art, **artifact_status(obj, verified, digest, manifest)}}
    meta = obj["metadata"]
    kube.patch_status(CONTRIBUTIONS, meta["namespace"], meta["name"], {"artifact": new["artifact"]})
    return new
