"""How a finished merge Job ended, as the operator reads it: the pods' exit and messages, the result file beside the composite, the verified copy and the gate (no tenant-writable state trusted)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from medforge_common.api import Reason as R
from medforge_common.api import (
    RevisionState,
)
from medforge_common.artifacts import RESULT_FILE
from medforge_common.attestation import REVISION_PREDICATE, Reason, TrustedKey
from medforge_common.manifest import Manifest
from medforge_common.result import MAX_RESULT_FILE_BYTES, read_result
from medforge_operator import (
    CONTRIBUTIONS,
    composite,
    jobs,
    jobstatus,
    metrics,
    signatures,
)
from medforge_operator.bodies import Obj
from medforge_operator.kubeapi import KubeApi
from medforge_operator.store import (
    ForgeStore,
    InvalidResult,
    StoreUnreachable,
    VerificationFailed,
)

JSON = dict[str, Any]


def _no_usable_input(store: ForgeStore, uri: Any, verdict: JSON) -> composite.Outcome:
    """The merger refused every input: a verdict on each (excluded with its reason), not a
    fault to retry."""
    report: JSON = {"inputs": []}
    try:
        if "resultFile" in verdict:
            report = store.read_json(uri, verdict["resultFile"], MAX_RESULT_FILE_BYTES, False)
    except StoreUnreachable as exc:
        return composite.Outcome(R.STORE_UNREACHABLE, str(exc))
    except VerificationFailed:
        pass  # the inputs then go as rejected, without the merger's reasons
    message = jobs.redact_urls(str(verdict.get("message") or "no input passed verification"))
    return composite.Outcome(RevisionState.REJECTED, message, report, reason=R.NO_USABLE_INPUT)


def outcome(
    job: JSON,
    kube: KubeApi,
    store: ForgeStore,
    ns: str,
    uri: Any,
    verified: Any,
    spec: JSON,
    previous: JSON,
    keys: list[TrustedKey] | None = None,
) -> composite.Outcome:
    """How the pending revision's Job ended; `previous` holds the metrics recorded for the
    revision it replaces (the gate compares); `keys` the forge namespace's Active keys."""
    pods = kube.job_pods(ns, job)
    summary = jobstatus.pod_summary(pods)
    if jobstatus.job_state(job) == "Failed":
        verdict = read_result(summary["failure_message"] or "")
        if verdict and verdict.get("verdict") == R.NO_USABLE_INPUT:
            return _no_usable_input(store, uri, verdict)
        reason, message = jobstatus.job_failure(job)
        detail = jobs.redact_urls(str(summary["failure_message"] or message))
        return composite.Outcome(
            RevisionState.FAILED,
            f"{reason}: {detail}",
            by_inputs=jobstatus.caused_by_inputs(summary),
        )
    result = read_result(summary["success_message"] or "")
    if not pods:  # the pods are gone: the result file in the store still tells
        result = {"artifact": {}, "resultFile": {"name": RESULT_FILE, "digest": None}}
    if not result or "artifact" not in result:
        return composite.Outcome(RevisionState.FAILED, "the merge Job wrote no result JSON")
    try:
        if "resultFile" in result:  # the full result went to the store beside the composite
            result = store.read_json(uri, result["resultFile"], MAX_RESULT_FILE_BYTES)
        art = result.get("artifact")
        digest = art.get("digest") if isinstance(art, dict) else None
        if not isinstance(digest, str) or not digest.startswith("sha256:"):
            raise InvalidResult(f"{R.INVALID_RESULT}: artifact.digest is missing")
        manifest = store.verify_copy(uri, verified, digest)
        signature = _forge_signature(store, uri, verified, manifest, digest, spec, keys, ns)
    except StoreUnreachable as exc:
        return composite.Outcome(R.STORE_UNREACHABLE, str(exc))
    except VerificationFailed as exc:
        text = jobs.redact_urls(str(exc))
        invalid = isinstance(exc, InvalidResult)
        metrics.verification_failed("composite", R.INVALID_RESULT if invalid else R.DIGEST_MISMATCH)
        return composite.Outcome(
            RevisionState.FAILED,
            ("" if invalid else f"{R.DIGEST_MISMATCH}: ") + text,
        )  # the merge's own output: no input explains it, so it never counts toward blame
    metrics.verified("composite", sum(f.size for f in manifest.files))
    result["artifact"]["files"] = [f.name for f in manifest.files]
    return _judged(result, previous, spec, signature)


def _forge_signature(
    store: ForgeStore,
    uri: Any,
    verified: Any,
    manifest: Manifest,
    digest: str,
    spec: JSON,
    keys: list[TrustedKey] | None,
    ns: str,
) -> JSON | None:
    """The verdict on the forge's bundle over the revision, where the composite signs."""
    if not spec.get("signing"):
        return None
    who = f"{ns}'s Institution"
    return signatures.artifact_signature(
        store, uri, verified, manifest, digest, keys or [], who, REVISION_PREDICATE
    )


def _judged(result: JSON, previous: JSON, spec: JSON, signature: JSON | None) -> composite.Outcome:
    """The verified revision before the gate: one whose files the forge's statement does not
    cover (or that carries none, though the composite signs) is never served; UnknownSigner (no
    Institution for the forge namespace yet) is recorded, not refused."""
    if signature is not None:
        if signature["state"] in (Reason.UNSIGNED, Reason.INVALID):
            if signature["state"] == Reason.UNSIGNED:  # SignatureInvalid is counted when judged
                metrics.verification_failed("composite", Reason.UNSIGNED)
            why = f"{signature['state']}: the forge's signature: {signature.get('message', '')}"
            return composite.Outcome(RevisionState.FAILED, why)
        result["artifact"]["signature"] = signature
    ok, message = composite.gate(result, previous, spec.get("gate"))
    message = jobs.redact_urls(message)
    state = RevisionState.ACCEPTED if ok else RevisionState.REJECTED
    return composite.Outcome(state, message, result)


def new_inputs(pending: JSON, result: JSON, kube: KubeApi) -> Iterator[tuple[JSON, JSON]]:
    """(the merger's entry, the contribution) for each new input of the revision whose
    contribution still carries the digest merged: what its hospital is told about."""
    new = set(pending.get("digests") or [])
    for i in result.get("inputs") or []:
        ns, name, digest = i.get("namespace"), i.get("name"), i.get("digest")
        if not (ns and name and digest in new):
            continue
        c = kube.get_object(CONTRIBUTIONS, str(ns), str(name))
        if (
            c is not None
            and ((c.get("status") or {}).get("artifact") or {}).get("digest") == digest
        ):
            yield i, c


def excluded_message(obj: Obj, pending: JSON, entry: JSON) -> str:
    """The merger's reason for excluding an input, for its hospital's namespace only."""
    me = f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"
    return f"{me} revision {pending['revision']}: {entry.get('reason', '')}"
