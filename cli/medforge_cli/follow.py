"""`medforge status`, `describe`, `logs` and `wait`: following contributions and composites."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from medforge_cli import views
from medforge_cli.cluster import Cluster
from medforge_cli.errors import CliError
from medforge_common.api import BaseModelPhase, ContributionPhase
from medforge_common.api import ConditionType as C

JSON = dict[str, Any]
KINDS = {
    "contribution": "contribution",
    "contributions": "contribution",
    "lorac": "contribution",
    "composite": "composite",
    "composites": "composite",
    "cmodel": "composite",
    "basemodel": "basemodel",
}
# What "done" means for `medforge wait`, per kind: (success, failure) on status.
DONE = {
    "contribution": (
        lambda s: s.get("phase") == ContributionPhase.SUCCEEDED,
        lambda s: s.get("phase") == ContributionPhase.FAILED,
    ),
    "basemodel": (
        lambda s: s.get("phase") == BaseModelPhase.READY,
        lambda s: s.get("phase") == BaseModelPhase.FAILED,
    ),
}


def status(cl: Cluster, args: argparse.Namespace) -> int:
    ns = None if args.all_namespaces or not args.namespace else args.namespace
    contribs = cl.objects("contribution", ns)
    composites = cl.objects("composite", ns)
    print("Contributions")
    print(
        views.table(views.CONTRIBUTION_HEADERS, [views.contribution_row(c) for c in contribs])
        if contribs
        else "  none"
    )
    print("\nComposites")
    print(
        views.table(views.COMPOSITE_HEADERS, [views.composite_row(c) for c in composites])
        if composites
        else "  none"
    )
    return 0


def describe(cl: Cluster, args: argparse.Namespace) -> int:
    ns = args.namespace or cl.default_namespace
    obj = cl.get("composite", ns, args.name)
    print(views.describe_composite(obj))
    return 0


def logs(cl: Cluster, args: argparse.Namespace) -> int:
    ns = args.namespace or cl.default_namespace
    obj = cl.get("contribution", ns, args.name)
    job = ((obj.get("status") or {}).get("job") or {}).get("name")
    if not job:
        raise CliError(
            f"contribution {ns}/{args.name} has no training Job yet "
            f"({views.condition(obj, 'Ready').get('reason', 'Pending')})"
        )
    pods = cl.job_logs(ns, job, args.tail)
    if not pods:
        raise CliError(f"Job {ns}/{job} has no pods left (they are removed with the Job's TTL)")
    for pod, text in pods:
        if len(pods) > 1:
            print(f"==> {pod} <==")
        sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
    return 0


def _composite_done(revision: int | None) -> tuple[Any, Any]:
    def ok(s: JSON) -> bool:
        current = (s.get("current") or {}).get("revision")
        return current is not None and (revision is None or int(current) >= revision)

    def failed(s: JSON) -> bool:
        return views.condition({"status": s}, C.STALLED).get("status") == "True"

    return ok, failed


def wait(cl: Cluster, args: argparse.Namespace) -> int:
    kind = KINDS.get(args.kind)
    if kind is None:
        raise CliError(f"unknown kind {args.kind!r}: use contribution, composite or basemodel", 2)
    ns = "" if kind == "basemodel" else (args.namespace or cl.default_namespace)
    ok, failed = DONE[kind] if kind in DONE else _composite_done(args.revision)
    deadline = time.monotonic() + args.timeout
    last = ""
    while True:
        obj = cl.get(kind, ns, args.name)
        st = obj.get("status") or {}
        ready = views.condition(obj, C.READY)
        line = f"{st.get('phase', 'Pending')}: {ready.get('reason', '')} {ready.get('message', '')}"
        if line != last and not args.quiet:
            print(f"[{time.strftime('%H:%M:%S')}] {args.name} {line}".rstrip(), flush=True)
            last = line
        if ok(st):
            return 0
        if failed(st):
            stalled = views.condition(obj, C.STALLED)
            raise CliError(
                f"{kind} {args.name} failed: {stalled.get('reason', '')}: "
                f"{stalled.get('message', '')}"
            )
        if time.monotonic() > deadline:
            raise CliError(
                f"timed out after {args.timeout:g} s waiting for {kind} {args.name} "
                f"({line.strip()})"
            )
        time.sleep(args.interval)
