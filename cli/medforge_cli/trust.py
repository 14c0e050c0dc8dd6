"""`medforge institution export` and `medforge composite verify`: the trust file (the
Institutions' public keys, the forge's among them) and the offline check of a pulled revision's
chain of custody against it (medforge_common.chain)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

from medforge_cli.errors import CliError
from medforge_common.chain import ChainBroken, Trust, load_trust, trust_document, verify_revision

JSON = dict[str, Any]


def cluster_document(cl: Any, models: bool = True, hint: str = "") -> JSON:
    """The trust document of the cluster's Institutions now (and its signed BaseModels'
    keys); `hint` is added to the error when the user may not list Institutions."""
    at = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    signed: list[JSON] = []
    if models:
        try:
            signed = cl.objects("basemodel", None)
        except CliError as exc:  # Institutions are enough for revisions
            print(f"note: BaseModels' keys left out: {exc}", file=sys.stderr)
    try:
        institutions = cl.objects("institution", None)
    except CliError as exc:
        raise CliError(f"{exc}{hint}") from None
    return trust_document(institutions, at, signed)


def export(args: argparse.Namespace) -> int:
    from medforge_cli.cluster import Cluster

    cl = Cluster.connect(args.kubeconfig, args.context)
    doc = cluster_document(cl, hint="; reading them needs the medforge-trust-reader ClusterRole")
    text = json.dumps(doc, indent=2) + "\n"
    if args.output in (None, "-"):
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
        keys = sum(1 for i in doc["institutions"] for k in i["keys"] if k["state"] == "Active")
        print(f"{len(doc['institutions'])} institution(s), {keys} active key(s) -> {args.output}")
    return 0


def read_trust(path: str) -> Trust:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"--trust {path}: {exc.strerror}; write one with `medforge institution "
                       "export -o trust.json`", 2) from None  # fmt: skip
    try:
        return load_trust(raw, path)
    except ChainBroken as exc:
        raise CliError(str(exc), 2) from None


def check(folder: Path, trust: Trust, namespace: str, name: str, args: argparse.Namespace) -> JSON:
    """The chain of a pulled revision in `folder`, or CliError (exit 1) naming the first link
    that fails."""
    try:
        report = verify_revision(folder, trust, namespace, args.allow_unsigned_inputs)
        claimed = report.get("revision") or {}
        if (claimed.get("namespace"), claimed.get("name")) != (namespace, name):
            raise ChainBroken(
                "revision signature",
                f"it signs {claimed.get('namespace')}/{claimed.get('name')}, not {namespace}/{name}",
            )
        want = getattr(args, "revision", None)
        if want is not None and claimed.get("revision") != want:
            raise ChainBroken(
                "revision signature", f"it signs revision {claimed.get('revision')}, not {want}"
            )
    except ChainBroken as exc:
        raise CliError(f"chain of custody broken at {exc}", 1) from None
    return report


def verify(args: argparse.Namespace) -> int:
    """Offline: the folder and the trust file are all it reads."""
    folder = Path(args.dir)
    if not folder.is_dir():
        raise CliError(f"--dir {folder}: not a folder; pull the revision with --format raw", 2)
    report = check(folder, read_trust(args.trust), args.namespace, args.name, args)
    print_report(report)
    return 0


def print_report(report: JSON) -> None:
    rev, signer = report.get("revision") or {}, report["signer"]
    print(
        f"ok  revision {rev.get('revision')} of {rev.get('namespace')}/{rev.get('name')}: "
        f"signed by {signer['institution']} (key {signer['keyId'][:16]}), "
        f"{report['files']} files match"
    )
    for i in report["inputs"]:
        if i.get("unsigned"):
            print(f"--  input {i['input']}: unsigned (allowed by --allow-unsigned-inputs)")
        else:
            print(f"ok  input {i['input']}: signed by {i['institution']} (key {i['keyId'][:16]})")
    if parent := report.get("parent"):
        print(
            f"--  built on revision {parent.get('revision')} ({str(parent.get('digest'))[:19]}"
            "...): its inputs are in its own statement; verify it too"
        )
    print(f"chain of custody holds: {len(report['inputs'])} input(s)")
