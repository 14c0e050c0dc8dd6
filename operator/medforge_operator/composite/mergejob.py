"""The merge Job: its plan (store URIs, signed when it may start), its grant, and its manifest."""

from __future__ import annotations

from typing import Any

from medforge_common.api import ExitCode
from medforge_common.artifacts import COMPOSITE_FILES, MANIFEST_FILE
from medforge_common.attestation import SIGNATURE_FILE, VERIFIED
from medforge_common.contract import MergeInput, MergePlan
from medforge_common.uris import S3Uri
from medforge_operator import basemodel, datajob, jobs, names, signing
from medforge_operator.bodies import Obj
from medforge_operator.composite import branches
from medforge_operator.composite.inputs import granted_privacy, key, ready_for
from medforge_operator.composite.planning import Plan, effective_integration
from medforge_operator.settings import Settings

JSON = dict[str, Any]
OUTPUT_FILES = COMPOSITE_FILES


def output_prefix(bucket: str, obj: Obj, revision: int) -> S3Uri:
    """Where a revision's merge Job uploads; the composite's uid is part of it (as for
    contributions)."""
    meta = obj["metadata"]
    return signing.revision_output(bucket, meta["namespace"], meta["name"], meta["uid"], revision)


def verified_prefix(bucket: str, obj: Obj, revision: int) -> S3Uri:
    """The operator's own copy of a verified revision: what later merges and pulls read."""
    meta = obj["metadata"]
    return signing.verified_revision(bucket, meta["namespace"], meta["name"], meta["uid"], revision)


def artifact_refs(prefix: S3Uri, files: list[str]) -> list[JSON]:
    """An artifact's files (manifest first) as a job plan lists them."""
    names_ = [MANIFEST_FILE, *[f for f in files if f != MANIFEST_FILE]]
    return [{"name": f, "get": str(prefix.join(f))} for f in names_]


def input_prefix(bucket: str, c: JSON) -> S3Uri:
    """Where a contribution's verified copy lies, derived from its identity and digest; the
    status must agree (an artifact verified before the operator kept copies waits for its copy)."""
    art = c["status"]["artifact"]
    meta = c["metadata"]
    prefix = signing.verified_contribution(
        bucket, meta["namespace"], meta["name"], meta["uid"], str(art.get("digest", ""))
    )
    if str(art.get("uri", "")) != str(prefix):
        raise ValueError(f"{key(c)}: status.artifact.uri is not its verified copy yet")
    return prefix


def merge_inputs(
    pending: JSON, contribs: list[JSON], base_digest: str
) -> tuple[list[JSON], list[JSON]]:
    """(new, all) inputs of a pending revision, found again among the contributions that still
    consent, are Ready and were trained for its base model: the plan a merge Job is signed for
    is derived afresh each time from these, never read back from the Job."""
    wanted = set(pending.get("inputs") or pending.get("digests") or [])
    new_digests = set(pending.get("digests") or [])
    found: list[JSON] = []
    for c in contribs:
        digest = ((c.get("status") or {}).get("artifact") or {}).get("digest")
        if digest in wanted and ready_for(c, base_digest):
            found.append(c)
    order = {d: i for i, d in enumerate(pending.get("inputs") or pending.get("digests") or [])}
    found.sort(key=lambda c: order.get(c["status"]["artifact"]["digest"], 0))
    return [c for c in found if c["status"]["artifact"]["digest"] in new_digests], found


def _plan_inputs(plan: Plan, bucket: str, status: JSON) -> list[MergeInput]:
    inputs: list[MergeInput] = []
    new = {c["status"]["artifact"]["digest"] for c in plan.new}
    for c in plan.all_inputs:
        art = c["status"]["artifact"]
        meta = c["metadata"]
        inputs.append(
            {
                "namespace": meta["namespace"],
                "name": meta["name"],
                "digest": art["digest"],
                # Inputs merged before are never blamed for a newcomer's regression.
                "new": art["digest"] in new,
                "task": art.get("task"),
                "files": artifact_refs(input_prefix(bucket, c), art.get("files", [])),
            }
        )
        if (parent := branches.merge_entry(status, c)) is not None:
            inputs[-1]["parent"] = parent  # merged relative to the revision it learnt on
        if (grant := granted_privacy(c)) is not None:
            inputs[-1]["privacy"] = grant  # the ledger's figure, into the revision's manifest
        if (signer := verified_signer(c)) is not None:
            # The operator's verdict and its verified copy of the bundle: the forge's
            # statement carries both, so the chain checks offline from the revision alone.
            bundle = input_prefix(bucket, c).join(SIGNATURE_FILE)
            inputs[-1]["signature"] = {**signer, "get": str(bundle)}
    return inputs


def verified_signer(c: JSON) -> JSON | None:
    """{institution, keyId} of a contribution whose signature the operator verified."""
    sig = ((c.get("status") or {}).get("artifact") or {}).get("signature") or {}
    if sig.get("state") != VERIFIED:
        return None
    return {"institution": sig.get("institution", ""), "keyId": sig.get("keyId", "")}


def merge_plan(
    composite: Obj,
    plan: Plan,
    base: basemodel.Resolved,
    output_uri: S3Uri,
    bucket: str,
) -> MergePlan:
    """The merge Job's config with store URIs in place of URLs (signed when the Job may start).
    Inputs are read from the operator's verified copies, in the forge bucket only."""
    spec, status = composite["spec"], composite.get("status") or {}
    current = status.get("current")
    # A withdrawal's replacement merges afresh, whatever the strategy.
    incremental = effective_integration(spec) == "incremental" and bool(current)
    incremental = incremental and not plan.replacement
    inputs = _plan_inputs(plan, bucket, status)
    cfg: MergePlan = {
        "kind": "merge",
        "composite": {
            "namespace": composite["metadata"]["namespace"],
            "name": composite["metadata"]["name"],
            "revision": plan.revision,
        },
        "baseModel": {"name": base.name, "digest": base.digest, "files": base.file_refs()},
        "strategy": spec.get("strategy", {}),
        "integration": "incremental" if incremental else "full",
        "inputs": inputs,
        "gate": spec.get("gate", {}),
        "output": {
            "uri": str(output_uri),
            "files": {f: jobs.put_ref(output_uri.join(f)) for f in OUTPUT_FILES},
        },
    }
    if spec.get("signing"):
        cfg["signing"] = {"keyFile": datajob.SIGNING_KEY}
        cfg["output"]["files"][SIGNATURE_FILE] = jobs.put_ref(output_uri.join(SIGNATURE_FILE))
    if (spec.get("branches") or {}).get("rank"):
        cfg["branches"] = {"rank": int(spec["branches"]["rank"])}
    if current is not None:
        # Regressions are measured against the revision this one replaces, in either mode.
        cfg["previous"] = {"revision": current["revision"], "metrics": current.get("metrics", {})}
    if incremental and current is not None:
        cprefix = verified_prefix(bucket, composite, int(current["revision"]))
        if str(current["uri"]) != str(cprefix):
            raise ValueError("status.current.uri is not this composite's verified revision")
        cfg["current"] = {
            "revision": current["revision"],
            "digest": current["digest"],
            "metrics": current.get("metrics", {}),
            "files": artifact_refs(cprefix, current.get("files", [])),
        }
    return cfg


def merge_grant(bucket: str, composite: Obj, plan: Plan, base: basemodel.Resolved) -> signing.Grant:
    signed = {c["status"]["artifact"]["digest"] for c in plan.all_inputs if verified_signer(c)}
    return signing.merge_grant(
        bucket, composite, plan.revision, base.uri, base.files, plan.all_inputs, signed
    )


def merge_job(composite: Obj, plan: Plan, settings: Settings, job_plan: MergePlan) -> JSON:
    """The merge Job; the forge's signing key (spec.signing) is mounted into it, nowhere else."""
    meta, spec = composite["metadata"], composite["spec"]
    key_volumes, key_mounts = datajob.signing_wiring(spec)
    return jobs.job_manifest(
        name=names.merge_job_name(meta["name"], plan.revision),
        namespace=meta["namespace"],
        owner=composite,
        component="merge",
        image=settings.merger_image,
        command=list(settings.merger_command),
        annotations={jobs.ANNOTATION_BASE_DIGEST: job_plan["baseModel"]["digest"]},
        env=[],
        labels={jobs.LABEL_REVISION: str(plan.revision)},
        resources=spec.get("resources") or {},
        volumes=key_volumes,
        volume_mounts=key_mounts,
        backoff_limit=1,
        active_deadline=None,
        ttl_seconds=settings.job_ttl_seconds,
        verdict_exit_codes=(ExitCode.VERDICT,),
    )
