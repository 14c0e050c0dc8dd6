"""The one signing policy: which store keys a Job may be given presigned URLs for.

The rule (docs/tenancy.md): nothing read from a tenant namespace decides what is signed. A
member namespace is the hospital's to write (`edit`): its Jobs, their annotations, pods,
termination messages and Secrets. So a Job's config is never parsed back from the Job; each
time URLs are signed, the plan is derived afresh from the custom resource and the BaseModel's
verified status, and every key in it must also lie inside the grant built here, independently,
from the same trusted sources:

- a training Job: PUT its own output files (`contributions/<ns>/<name>/<uid>/<generation>/`,
  the contribution's uid and generation only); GET the verified BaseModel's files, and with
  spec.startFrom the manifest and merged update of the revision published to it;
- a merge Job: PUT its own revision's files (`composites/<ns>/<name>/<uid>/rev-<N>/`); GET the
  verified BaseModel's files, the verified copies of the consenting inputs' artifacts, and the
  composite's own revision it builds on.

- an evaluation Job (a hospital's EvaluationSet scoring a candidate): PUT its one result file;
  GET the verified BaseModel's files, the candidate's and the served revision's model files
  (not their tasks file), and the hospital's own verified contributions' head and fingerprints.

Later features extend the grants here, each with its own attacker test.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass
from typing import Any

from medforge_common.artifacts import (
    ADAPTER_FILE,
    COMPOSITE_FILES,
    CONTRIBUTION_FILES,
    EVALUATION_FILE,
    FINGERPRINTS_FILE,
    HEAD_FILE,
    MANIFEST_FILE,
    MIXTURE_FILE,
)
from medforge_common.attestation import SIGNATURE_FILE
from medforge_common.uris import S3Uri, UriError, parse_uri
from medforge_operator.bodies import Obj

JSON = dict[str, Any]
VERIFIED = "verified/"  # no PUT URL ever targets a key below it (checked in `grant`)


class SigningRefused(Exception):
    """A plan asked for a URL outside its Job's grant: nothing is signed."""

    def __init__(self, method: str, target: str) -> None:
        super().__init__(f"refused to sign {method} for {target}: outside what this Job may reach")
        self.method = method
        self.target = target


@dataclass(frozen=True)
class Grant:
    """The whole keys one Job may read (gets) and write (puts), in one bucket."""

    bucket: str
    gets: frozenset[str]
    puts: frozenset[str]

    def allows(self, method: str, uri: S3Uri) -> bool:
        if uri.bucket != self.bucket or not uri.key or uri.key.endswith("/"):
            return False
        if method == "put":
            return uri.key in self.puts and not uri.key.startswith(VERIFIED)
        return uri.key in self.gets


def contribution_output(bucket: str, namespace: str, name: str, uid: str, generation: int) -> S3Uri:
    """Where a training Job uploads: its contribution's uid and generation are part of it."""
    return S3Uri(bucket, f"contributions/{namespace}/{name}/{uid}/{generation}/")


def verified_contribution(bucket: str, namespace: str, name: str, uid: str, digest: str) -> S3Uri:
    """Where the operator keeps its own copy of a verified contribution (no PUT reaches it)."""
    return S3Uri(
        bucket,
        f"{VERIFIED}contributions/{namespace}/{name}/{uid}/{digest.removeprefix('sha256:')}/",
    )


def revision_output(bucket: str, namespace: str, name: str, uid: str, revision: int) -> S3Uri:
    return S3Uri(bucket, f"composites/{namespace}/{name}/{uid}/rev-{revision}/")


def verified_revision(bucket: str, namespace: str, name: str, uid: str, revision: int) -> S3Uri:
    return S3Uri(bucket, f"{VERIFIED}composites/{namespace}/{name}/{uid}/rev-{revision}/")


def _keys(prefix: S3Uri, files: Iterable[str]) -> set[str]:
    return {prefix.join(f).key for f in {MANIFEST_FILE, *files}}


def training_grant(
    bucket: str,
    contribution: Obj,
    base_uri: S3Uri,
    base_files: Iterable[str],
    parent: tuple[str, str, str, int] | None = None,
) -> Grant:
    """`parent`: (namespace, name, uid, revision) of the composite revision it starts from
    (spec.startFrom, resolved by medforge_operator.branching: published to its namespace);
    of that revision only its verified manifest and merged update, never its tasks file."""
    meta = contribution["metadata"]
    gets = _keys(base_uri, base_files)
    if parent is not None:
        gets |= _keys(verified_revision(bucket, *parent), [ADAPTER_FILE])
    out = contribution_output(
        bucket, meta["namespace"], meta["name"], meta["uid"], int(meta["generation"])
    )
    # The signature's PUT only where the hospital signs (spec.signing): its own key, its Job.
    signed = (SIGNATURE_FILE,) if (contribution.get("spec") or {}).get("signing") else ()
    return Grant(
        bucket,
        frozenset(gets),
        frozenset(out.join(f).key for f in (*CONTRIBUTION_FILES, *signed)),
    )


def merge_grant(
    bucket: str,
    composite: Obj,
    revision: int,
    base_uri: S3Uri,
    base_files: Iterable[str],
    inputs: Iterable[JSON],
    signed: Container[str] = (),
) -> Grant:
    """`inputs`: the consenting, verified contributions this revision may read (the caller
    checked consent); each is reached only at the verified copy of its current artifact, and
    the bundle beside it for those whose signature verified (`signed`: their digests). The
    forge's own signature is one more PUT where the composite signs (spec.signing)."""
    meta = composite["metadata"]
    gets = _keys(base_uri, base_files)
    for c in inputs:
        art = (c.get("status") or {}).get("artifact") or {}
        cm = c["metadata"]
        prefix = verified_contribution(
            bucket, cm["namespace"], cm["name"], cm["uid"], str(art.get("digest", ""))
        )
        files = [f for f in art.get("files") or [] if isinstance(f, str)]
        gets |= _keys(prefix, [*files, *([SIGNATURE_FILE] if art.get("digest") in signed else [])])
    current = (composite.get("status") or {}).get("current") or {}
    if current.get("revision") is not None:
        prefix = verified_revision(
            bucket, meta["namespace"], meta["name"], meta["uid"], int(current["revision"])
        )
        gets |= _keys(prefix, [f for f in current.get("files") or [] if isinstance(f, str)])
    out = revision_output(bucket, meta["namespace"], meta["name"], meta["uid"], revision)
    sig = (SIGNATURE_FILE,) if (composite.get("spec") or {}).get("signing") else ()
    puts = frozenset(out.join(f).key for f in (*COMPOSITE_FILES, *sig))
    return Grant(bucket, frozenset(gets), puts)


def evaluation_prefix(bucket: str, composite: Obj, revision: int, evaluation_set: Obj) -> S3Uri:
    """Where a site's evaluation Job writes its figures for one candidate: the composite's and
    the set's uids are part of it, so no earlier object of the same name reaches it."""
    cm, em = composite["metadata"], evaluation_set["metadata"]
    return S3Uri(
        bucket,
        f"evaluations/{cm['namespace']}/{cm['name']}/{cm['uid']}/rev-{revision}/"
        f"{em['namespace']}/{em['name']}/{em['uid']}/",
    )


def evaluation_result(bucket: str, composite: Obj, revision: int, evaluation_set: Obj) -> S3Uri:
    return evaluation_prefix(bucket, composite, revision, evaluation_set).join(EVALUATION_FILE)


def evaluation_grant(
    bucket: str,
    composite: Obj,
    revisions: Iterable[tuple[int, Iterable[str]]],
    base_uri: S3Uri,
    base_files: Iterable[str],
    own: Iterable[JSON],
    evaluation_set: Obj,
    revision: int,
) -> Grant:
    """An evaluation Job in a hospital's namespace: GET the verified BaseModel, the model files
    of the candidate and the served revision (never their tasks file, which holds every task's
    head and distilled set), and the verified copies of the hospital's own contributions (its
    head, its training fingerprints) in the set's own namespace only; PUT its one result."""
    meta = composite["metadata"]
    gets = _keys(base_uri, base_files)
    for rev, files in revisions:
        prefix = verified_revision(bucket, meta["namespace"], meta["name"], meta["uid"], rev)
        gets |= _keys(prefix, [f for f in files if f in (ADAPTER_FILE, MIXTURE_FILE)])
    ns = evaluation_set["metadata"]["namespace"]
    for c in own:
        cm, art = c["metadata"], (c.get("status") or {}).get("artifact") or {}
        if cm.get("namespace") != ns:
            continue
        prefix = verified_contribution(
            bucket, ns, cm["name"], cm["uid"], str(art.get("digest", ""))
        )
        gets |= _keys(
            prefix, [f for f in art.get("files") or [] if f in (HEAD_FILE, FINGERPRINTS_FILE)]
        )
    out = evaluation_result(bucket, composite, revision, evaluation_set)
    return Grant(bucket, frozenset(gets), frozenset({out.key}))


def refs(plan: Any) -> list[tuple[str, str]]:
    """Every (method, uri) a plan asks to be signed."""
    out: list[tuple[str, str]] = []
    if isinstance(plan, list):
        for v in plan:
            out += refs(v)
    elif isinstance(plan, dict):
        if set(plan) == {"put"}:
            return [("put", str(plan["put"]))]
        if isinstance(plan.get("get"), str):
            out.append(("get", plan["get"]))
        for k, v in plan.items():
            if k != "get":
                out += refs(v)
    return out


def check(plan: Any, grant: Grant) -> None:
    """Raises SigningRefused for the first key the plan asks for outside the grant."""
    for method, target in refs(plan):
        try:
            uri = parse_uri(target, "job plan")
        except UriError as exc:
            raise SigningRefused(method, target[:200]) from exc
        if not isinstance(uri, S3Uri) or not grant.allows(method, uri):
            raise SigningRefused(method, target[:200])


def sign(
    plan: Any,
    grant: Grant,
    presign_get: Callable[[S3Uri], str],
    presign_put: Callable[[S3Uri], str],
) -> Any:
    """The job config from its plan, after every key was checked against the grant: each
    {"get": uri} becomes "url" beside the entry's other keys, each {"put": uri} the PUT URL."""
    check(plan, grant)
    return _sign(plan, presign_get, presign_put)


def _sign(
    plan: Any, presign_get: Callable[[S3Uri], str], presign_put: Callable[[S3Uri], str]
) -> Any:
    if isinstance(plan, list):
        return [_sign(v, presign_get, presign_put) for v in plan]
    if not isinstance(plan, dict):
        return plan
    if set(plan) == {"put"}:
        return presign_put(_s3(plan["put"]))
    out = {k: _sign(v, presign_get, presign_put) for k, v in plan.items() if k != "get"}
    if isinstance(plan.get("get"), str):
        out["url"] = presign_get(_s3(plan["get"]))
    return out


def _s3(value: str) -> S3Uri:
    uri = parse_uri(value, "job plan")
    if not isinstance(uri, S3Uri):
        raise SigningRefused("sign", value[:200])
    return uri
