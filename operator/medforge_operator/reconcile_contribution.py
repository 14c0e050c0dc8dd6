"""One reconcile round of a LoRAContribution: observe, act (create or retire Jobs, verify the
artifact), then write the status computed by `contribution.compute_status`."""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from typing import Any

from medforge_common.uris import UriError
from medforge_operator import CONTRIBUTIONS, contribution, jobs, names
from medforge_operator.kube import Kube
from medforge_operator.metrics import JOBS_CREATED, VERIFICATIONS
from medforge_operator.settings import Settings
from medforge_operator.store import ForgeStore, StoreUnreachable, VerificationFailed, s3_uri

JSON = dict[str, Any]
EventFn = Callable[[JSON, str, str, str], None]
log = logging.getLogger("medforge.contribution")


# Per store, per base-model prefix: (when, names listed, their presigned GET URLs).
_Listing = tuple[float, list[str], list[JSON]]
_listing_cache: weakref.WeakKeyDictionary[ForgeStore, dict[str, _Listing]] = (
    weakref.WeakKeyDictionary()
)
LISTING_TTL = 30.0


def base_model_files(store: ForgeStore, spec: JSON) -> list[JSON]:
    """Presigned GET URLs for every file of the base model. The listing and its URLs are cached
    briefly, so a burst of contributions for one model does not list and sign it once each:
    only the workers that miss at the same moment do. (Signing presigned URLs held the GIL for
    a fifth of the operator's busy time in the 1,000-contribution benchmark.) No lock: a slow
    or unreachable store must not make every worker wait on one listing. A cached URL has lost
    at most a tenth of its lifetime."""
    prefix = s3_uri(spec["baseModel"]["uri"], "spec.baseModel.uri")
    ttl = min(LISTING_TTL, store.s.presign_expiry_seconds / 10)
    per_store = _listing_cache.setdefault(store, {})
    cached = per_store.get(str(prefix))
    if cached is None or time.monotonic() - cached[0] >= ttl:
        names_ = store.list_names(prefix)
        files = []
        if "manifest.json" in names_:
            files = [
                {"name": n, "url": store.presign_get(prefix.join(n))}
                for n in names_
                if "/" not in n
            ]
        cached = (time.monotonic(), names_, files)
        per_store[str(prefix)] = cached
    if "manifest.json" not in cached[1]:
        raise VerificationFailed(f"spec.baseModel.uri: {prefix} holds no manifest.json")
    return [dict(f) for f in cached[2]]  # callers own their copies


def settled(obj: JSON) -> bool:
    """Nothing left to do for this generation."""
    st = obj.get("status") or {}
    return st.get("observedGeneration") == obj["metadata"].get("generation") and st.get(
        "phase"
    ) in ("Succeeded", "Failed")


# Ready reasons of an unsettled contribution whose next step comes as an event of its Job or its
# pods (the label-selected watches): polling such a contribution would only repeat reads.
WATCH_DRIVEN = frozenset({"JobCreated", "Training", "CreateContainerConfigError"})


def needs_polling(obj: JSON) -> bool:
    """Whether an unsettled contribution waits on something no watch reports: a store that is
    unreachable, a base model not uploaded yet, digests still to verify, or no status yet for
    this generation."""
    st = obj.get("status") or {}
    if settled(obj):
        return False
    if st.get("observedGeneration") != obj["metadata"].get("generation"):
        return True
    ready: JSON = next((c for c in st.get("conditions") or [] if c.get("type") == "Ready"), {})
    return ready.get("reason") not in WATCH_DRIVEN


def reconcile(obj: JSON, kube: Kube, store: ForgeStore, s: Settings, event: EventFn) -> JSON:
    """Returns the status written (or the unchanged one)."""
    meta = obj["metadata"]
    ns, name, gen = meta["namespace"], meta["name"], int(meta["generation"])
    old = obj.get("status") or {}
    if settled(obj) and old.get("phase") == "Succeeded":
        return old
    job_name = names.training_job_name(name, gen)
    o = contribution.Observation(generation=gen, job_name=job_name, job=None)

    # A spec change retires the Jobs of older generations (generation 1 has none).
    older = (
        kube.list_jobs(ns, f"{jobs.LABEL_OWNER}={name},{jobs.LABEL_COMPONENT}=train")
        if gen > 1
        else []
    )
    for stale in older:
        if stale["metadata"]["name"] != job_name:
            kube.delete_job(ns, stale["metadata"]["name"])
            event(
                obj,
                "Normal",
                "RetiredJob",
                f"deleted Job {stale['metadata']['name']} of an older spec",
            )

    # Before the first status, the Job cannot exist yet unless an earlier round was cut short;
    # create_job returns the existing Job on a name conflict either way.
    o.job = kube.get_job(ns, job_name) if old.get("observedGeneration") == gen else None
    if o.job is None and not (settled(obj) and old.get("phase") == "Failed"):
        try:
            output = contribution.output_prefix(store.bucket, ns, name, gen)
            outputs = {f: store.presign_put(output.join(f)) for f in contribution.OUTPUT_FILES}
            config = contribution.train_config(
                obj, base_model_files(store, obj["spec"]), outputs, output
            )
            o.job = kube.create_job(contribution.training_job(obj, s, config))
            JOBS_CREATED.labels("train").inc()
        except StoreUnreachable as exc:
            o.store_error = str(exc)
        except (UriError, VerificationFailed) as exc:
            o.build_error = str(exc)
    if o.job is not None and o.job.get("status") and not jobs.never_started(o.job):
        o.pods = kube.job_pods(ns, job_name)
        if jobs.job_state(o.job) == "Complete":
            verify(obj, o, store)
    new = contribution.compute_status(old, o)
    if contribution.status_changed(old, new):
        patch = dict(new)
        for key in set(old) - set(new) - {"kopf"}:
            patch[key] = None  # a merge patch removes keys only when told to
        kube.patch_status(CONTRIBUTIONS, ns, name, patch)
        if old.get("phase") != new.get("phase") or old.get("observedGeneration") != gen:
            ready = next(c for c in new["conditions"] if c["type"] == "Ready")
            kind = (
                "Warning"
                if new.get("phase") == "Failed"
                or ready["reason"] in ("CreateContainerConfigError", "StoreUnreachable")
                else "Normal"
            )
            event(obj, kind, ready["reason"], f"{new.get('phase')}: {ready['message']}".strip())
    return new


def verify(obj: JSON, o: contribution.Observation, store: ForgeStore) -> None:
    """Check the uploaded files against the manifest before the contribution becomes Ready."""
    spec = obj["spec"]
    result = contribution.success_result(o.pods)
    if result is None or "artifact" not in result:
        o.verify_error = (
            "NoResult",
            "the training Job succeeded but wrote no result JSON to its termination message",
        )
        return
    art = result["artifact"]
    prefix = contribution.output_prefix(
        store.bucket, obj["metadata"]["namespace"], obj["metadata"]["name"], o.generation
    )
    try:
        manifest = store.verify_artifact(prefix, str(art.get("digest", "")))
    except StoreUnreachable as exc:
        o.verify_error = ("StoreUnreachable", str(exc))
        return
    except VerificationFailed as exc:
        VERIFICATIONS.labels("failed").inc()
        o.verify_error = ("DigestMismatch", str(exc))
        return
    if manifest.base_model_digest != spec["baseModel"]["digest"]:
        VERIFICATIONS.labels("failed").inc()
        o.verify_error = (
            "BaseModelMismatch",
            f"the adapter was trained for base model "
            f"{manifest.base_model_digest[:19]}..., not spec.baseModel.digest "
            f"{spec['baseModel']['digest'][:19]}...",
        )
        return
    VERIFICATIONS.labels("ok").inc()
    meta = manifest.meta
    artifact: JSON = {
        "uri": str(prefix),
        "digest": art["digest"],
        "sizeBytes": sum(f.size for f in manifest.files),
        "files": [f.name for f in manifest.files],
        "rank": meta.get("rank", spec.get("lora", {}).get("rank")),
        "targetModules": meta.get("targetModules", spec.get("lora", {}).get("targetModules")),
        "baseModelDigest": manifest.base_model_digest,
        "task": spec["task"]["name"],
    }
    if "distilled.safetensors" in artifact["files"]:
        d = next(f for f in manifest.files if f.name == "distilled.safetensors")
        artifact["distilled"] = {"uri": str(prefix.join(d.name)), "digest": "sha256:" + d.sha256}
    o.verified = {"artifact": artifact, "metrics": result.get("metrics") or meta.get("metrics", {})}
