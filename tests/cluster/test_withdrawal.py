"""Withdrawal on the local cluster: three hospitals contribute; the second withdraws its consent
and the next revision holds only the first and third, the third is then deleted and the next
holds only the first; after each, the store keeps no file of the hospital that left and no
revision holding its digest; only the erasure receipts name it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from medforge_localcluster.s3 import client
from tests.cluster.conftest import Forge, base_model
from tests.cluster.test_cli import medforge
from tests.cluster.test_composite import composite_doc, contribution, tagged_members
from tests.cluster.test_operator import status
from tests.conftest import ClusterAccess
from tests.helpers import wait_until

pytestmark = pytest.mark.usefixtures("operator")


@pytest.fixture
def hospitals(cluster: ClusterAccess) -> Iterator[tuple[str, list[str]]]:
    yield from tagged_members(cluster, "withdraw", 3)


def accepted(cluster: ClusterAccess, ns: str, revision: int) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        st = status(cluster, "cmodel", ns, "forge")
        cur = st.get("current") or {}
        return st if cur.get("revision") == revision and not st.get("rebuild") else None

    try:
        return wait_until(check, 120, what=f"revision {revision} accepted")
    except AssertionError as exc:
        st = status(cluster, "cmodel", ns, "forge")
        raise AssertionError(f"{exc}; status: {json.dumps(st, indent=1)[:4000]}") from None


def erased(cluster: ClusterAccess, ns: str, who: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        st = status(cluster, "cmodel", ns, "forge")
        w = next((w for w in st.get("withdrawals") or [] if w["namespace"] == who), None)
        return w if w and w["state"] == "Erased" else None

    return wait_until(check, 60, what=f"erasure of {who}'s files")


def store_snapshot(forge: Forge) -> dict[str, bytes]:
    """Every key and object version in the forge bucket, with the bodies of the small ones."""
    s3 = client(forge.endpoint, forge.access_key, forge.secret_key)
    out: dict[str, bytes] = {}
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=forge.bucket):
        for v in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]:
            key, vid = v["Key"], v.get("VersionId")
            body = b""
            if v.get("Size", 0) < 1 << 20 and "Size" in v:
                extra = {"VersionId": vid} if vid and vid != "null" else {}
                body = s3.get_object(Bucket=forge.bucket, Key=key, **extra)["Body"].read()
            out[f"{key}@{vid}"] = body
    return out


def assert_gone(snapshot: dict[str, bytes], ns: str, digest: str, forge_ns: str) -> None:
    hexdigest = digest.removeprefix("sha256:")
    for key, body in snapshot.items():
        if key.startswith("receipts/"):
            continue
        assert f"/{ns}/" not in key, f"{key} is still in the store"
        assert hexdigest.encode() not in body, f"{key} still names {digest}"
    receipts = [k for k in snapshot if k.startswith(f"receipts/{forge_ns}/forge/")]
    assert any(f"-{ns}-" in k for k in receipts), receipts


def test_a_hospital_that_leaves_is_removed_from_every_later_revision(
    cluster: ClusterAccess,
    forge_namespace: str,
    forge: Forge,
    hospitals: tuple[str, list[str]],
    tmp_path: Path,
) -> None:
    namespace = forge_namespace
    tag, (first, second, third) = hospitals
    base = base_model(cluster, forge, "clip-withdraw")
    cluster.apply(namespace, composite_doc(base, tag, minContributions=3))
    for ns, task in ((first, "breakhis"), (second, "lung"), (third, "colon")):
        cluster.apply(ns, contribution(task, base, task=task))
    st = accepted(cluster, namespace, 1)
    assert st["current"]["inputCount"] == 3
    digests = {i["namespace"]: i["digest"] for i in st["current"]["inputs"]}

    # The second hospital withdraws its consent: no action by the forge.
    t0 = time.monotonic()
    cluster.kubectl(
        "patch", "lorac", "lung", "-n", second, "--type=merge",
        "-p", '{"spec": {"sharing": {"forges": []}}}',
    )  # fmt: skip
    st = accepted(cluster, namespace, 2)
    took = time.monotonic() - t0
    assert {i["namespace"] for i in st["current"]["inputs"]} == {first, third}
    one = next(h for h in st["history"] if h["revision"] == 1)
    assert one["state"] == "Withdrawn" and one["withdrawnReason"] == "ConsentWithdrawn"
    assert one["withdrawnInput"] == f"{second}/lung"
    record = erased(cluster, namespace, second)
    assert record["revisions"] == [1] and record["replacement"] == 2
    print(f"\nconsent withdrawn -> replacement accepted and erased in {took:.1f} s")
    assert_gone(store_snapshot(forge), second, digests[second], namespace)
    used = status(cluster, "lorac", second, "lung").get("usedBy") or []
    mine = next(u for u in used if u["composite"] == f"{namespace}/forge")
    assert mine["reason"] == "ConsentWithdrawn" and mine["erasedAt"] and mine["replacedBy"] == 2
    events = cluster.kubectl("get", "events", "-n", second).stdout
    assert "Erased" in events and "Withdrawn" in events

    # The third hospital deletes its contribution.
    t0 = time.monotonic()
    cluster.kubectl("delete", "lorac", "colon", "-n", third)
    st = accepted(cluster, namespace, 3)
    took = time.monotonic() - t0
    assert [i["namespace"] for i in st["current"]["inputs"]] == [first]
    states = {h["revision"]: h["state"] for h in st["history"]}
    assert states == {1: "Withdrawn", 2: "Withdrawn", 3: "Accepted"}
    erased(cluster, namespace, third)
    print(f"contribution deleted -> replacement accepted and erased in {took:.1f} s")
    snapshot = store_snapshot(forge)
    assert_gone(snapshot, third, digests[third], namespace)
    # The first hospital's files and the served revision are still there.
    assert any(f"contributions/{first}/" in k for k in snapshot)
    assert any("/rev-3/" in k for k in snapshot)
    assert "Erased" in cluster.kubectl("get", "events", "-n", third).stdout
    described = medforge(cluster, forge, "describe", "composite", "forge", "-n", namespace)
    assert "Withdrawals" in described.stdout and f"{third}/colon" in described.stdout
    refused = medforge(
        cluster, forge, "composite", "pull", "forge", "-n", namespace,
        "--revision", "2", "-o", str(tmp_path / "r2"),
    )  # fmt: skip
    assert refused.returncode != 0 and "withdrawn" in refused.stderr
