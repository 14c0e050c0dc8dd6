"""`medforge pull`: a served revision of a composite out of the forge store, its manifest checked against the digest in the composite's status, written raw, as a peft adapter, or merged into the base model (fetched by digest into the local cache)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from medforge_cli import export, trust
from medforge_cli.errors import CliError
from medforge_cli.models import MANIFEST, Progress, Store
from medforge_common.api import RevisionState
from medforge_common.attestation import MAX_REVISION_SIGNATURE_BYTES, SIGNATURE_FILE
from medforge_common.chain import trust_of
from medforge_common.manifest import (
    Manifest,
    ManifestError,
    digest_of,
)

JSON = dict[str, Any]


def _revision(
    obj: JSON, revision: int | None, allow_withdrawn: bool = False
) -> tuple[int, str, str, JSON]:
    """(revision, s3 uri, manifest digest, history entry) of an accepted revision; a withdrawn
    one only when asked for by number with `allow_withdrawn` (while its files are kept)."""
    st = obj.get("status") or {}
    current = st.get("current") or {}
    name = f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"
    if not current:
        raise CliError(f"composite {name} has no accepted revision yet")
    want = revision if revision is not None else int(current["revision"])
    if want == int(current["revision"]):
        return want, str(current["uri"]), str(current["digest"]), current
    entry = next((h for h in st.get("history") or [] if h.get("revision") == want), None)
    if entry is None:
        raise CliError(f"composite {name} keeps no revision {want} (status.history)")
    withdrawn = entry.get("state") == RevisionState.WITHDRAWN
    if withdrawn and not allow_withdrawn:
        raise CliError(
            f"revision {want} of {name} was withdrawn ({entry.get('withdrawnReason', '')}: it "
            f"held {entry.get('withdrawnInput', 'an input')}, which left); it is not served. "
            "Pass --allow-withdrawn to take it anyway while its files are kept, for an audit"
        )
    accepted = entry.get("stateBefore" if withdrawn else "state") == RevisionState.ACCEPTED
    if not accepted or not entry.get("digest"):
        raise CliError(
            f"revision {want} of {name} was {entry.get('state')} "
            f"({entry.get('reason', '')}): only accepted revisions are published"
        )
    uri = str(current["uri"]).rstrip("/")
    uri = uri[: uri.rindex("/")] + f"/rev-{want}/"
    return want, uri, str(entry["digest"]), entry


def pull(args: argparse.Namespace) -> int:

    from medforge_cli.cluster import Cluster

    out = Path(args.output)
    if out.exists() and any(out.iterdir()):
        raise CliError(f"{out}: not empty; give a new folder", 2)
    cl = Cluster.connect(args.kubeconfig, args.context)
    ns = args.namespace or cl.default_namespace
    obj = cl.get("composite", ns, args.name)
    revision, uri, digest, _ = _revision(obj, args.revision, args.allow_withdrawn)
    base_name = str(((obj.get("spec") or {}).get("baseModel") or {}).get("name", ""))
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    store = Store.from_args(args, bucket=bucket)
    try:
        raw = store.read(key + MANIFEST)
    except CliError as exc:
        raise CliError(
            f"revision {revision}: {exc} (an erased revision is gone for good)"
        ) from None
    if digest_of(raw) != digest:
        raise CliError(
            f"manifest.json of revision {revision} does not match the digest in the "
            f"composite's status ({digest[:19]}...); the store was changed"
        )
    try:
        manifest = Manifest.from_json(raw.decode(), uri + MANIFEST)
    except (ManifestError, UnicodeDecodeError) as exc:
        raise CliError(str(exc)) from None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / MANIFEST).write_bytes(raw)
        progress = Progress(sum(e.size for e in manifest.files), "downloading")
        for e in manifest.files:
            store.download_verified(key + e.name, e, work / e.name)
            progress(e.size)
        progress.close()
        _verify(args, cl, obj, store, key, work, revision)
        out.mkdir(parents=True, exist_ok=True)
        report = _write(args, cl, work, manifest, base_name, out)
    summary = {
        "composite": f"{ns}/{args.name}",
        "revision": revision,
        "digest": digest,
        "format": args.format,
        "baseModel": {"name": base_name, "digest": manifest.base_model_digest},
        **report,
    }
    (out / "medforge-export.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"revision {revision} of {ns}/{args.name} ({digest[:19]}...) written to {out} "
        f"as {args.format}"
    )
    if report.get("relativeError") is not None:
        print(f"low-rank reconstruction error (relative Frobenius): {report['relativeError']:.2e}")
    return 0


def _verify(
    args: argparse.Namespace, cl: Any, obj: JSON, store: Store, key: str, work: Path, revision: int
) -> None:
    """The chain of custody, before anything is written: the forge's bundle beside the files,
    checked against --trust or, by default, the cluster's Institutions as they are now."""
    ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    try:
        (work / SIGNATURE_FILE).write_bytes(
            store.read(key + SIGNATURE_FILE, MAX_REVISION_SIGNATURE_BYTES)
        )
    except CliError as exc:
        if "not found" not in str(exc):
            raise
        if (obj.get("spec") or {}).get("signing") and not args.no_verify:
            raise CliError(
                f"revision {revision} of {ns}/{name} has no forge signature, though the "
                "composite signs its revisions (spec.signing); pass --no-verify to take it anyway"
            ) from None
        print(f"note: revision {revision} of {ns}/{name} is not signed", file=sys.stderr)
        return
    if args.no_verify:
        return
    if args.trust:
        chain_trust = trust.read_trust(args.trust)
    else:
        hint = (
            "; to check the revision's signatures, pass --trust with a trust file "
            "(`medforge institution export`, medforge-trust-reader), or --no-verify"
        )
        doc = trust.cluster_document(cl, models=False, hint=hint)
        chain_trust = trust_of(doc, "the cluster's Institutions")
    report = trust.check(
        work, chain_trust, ns, name, argparse.Namespace(**{**vars(args), "revision": revision})
    )
    trust.print_report(report)


def _write(
    args: argparse.Namespace, cl: Any, work: Path, manifest: Manifest, base_name: str, out: Path
) -> JSON:
    """The revision in `work` written to `out` in the asked format; export figures, if any."""
    if args.format == "raw":
        for p in work.iterdir():
            shutil.copy2(p, out / p.name)
        return {}
    if args.format == "peft":
        return export.to_peft(work, manifest, out, args.rank)
    base_dir = fetch_base_model(cl, args, base_name, manifest.base_model_digest)
    from medforge_cli import inference

    inference.merged(base_dir, work, out)
    return {}


def cache_root() -> Path:
    if env := os.environ.get("MEDFORGE_CACHE_DIR"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medforge"


def fetch_base_model(cl: Any, args: argparse.Namespace, name: str, digest: str) -> Path:
    """The base model's verified files in the local cache (by digest), from the BaseModel's
    verified status and the forge store."""

    target = cache_root() / "base-models" / digest.removeprefix("sha256:")
    if (target / ".complete").is_file():
        return target
    bm = cl.get("basemodel", "", name)
    st = bm.get("status") or {}
    if st.get("digest") != digest or not st.get("uri"):
        raise CliError(
            f"BaseModel {name} is not verified at {digest[:19]}... (it reports "
            f"{str(st.get('digest'))[:19]}...); the composite was merged on another one"
        )
    bucket, _, key = str(st["uri"]).removeprefix("s3://").partition("/")
    key = key if key.endswith("/") else key + "/"
    store = Store.from_args(args, bucket=bucket)
    raw = store.read(key + MANIFEST)
    if digest_of(raw) != digest:
        raise CliError(f"the stored manifest of BaseModel {name} is not {digest[:19]}...")
    manifest = Manifest.from_json(raw.decode(), f"{st['uri']}{MANIFEST}")
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    progress = Progress(sum(e.size for e in manifest.files), f"base model {name}")
    for e in manifest.files:
        store.download_verified(key + e.name, e, partial / e.name)
        progress(e.size)
    progress.close()
    (partial / MANIFEST).write_bytes(raw)
    (partial / ".complete").write_text(digest)
    if target.exists():
        shutil.rmtree(target)
    partial.rename(target)
    return target
