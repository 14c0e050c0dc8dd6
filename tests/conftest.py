"""Shared fixtures: the local cluster (or a real one), a namespace per test, an S3 bucket.

Tests under tests/unit are marked `unit`, tests under tests/cluster `cluster`, by directory.
Point the cluster tests at a real cluster and S3 store instead with MEDFORGE_TEST_KUBECONFIG
plus MEDFORGE_TEST_S3_ENDPOINT, MEDFORGE_TEST_S3_ACCESS_KEY and MEDFORGE_TEST_S3_SECRET_KEY.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from medforge_localcluster.cluster import LocalCluster


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "unit" in parts:
            item.add_marker(pytest.mark.unit)
        elif "cluster" in parts:
            item.add_marker(pytest.mark.cluster)
        elif "images" in parts:
            item.add_marker(pytest.mark.images)


@dataclass(frozen=True)
class ClusterAccess:
    kubeconfig: Path
    kubectl_path: str
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    state_dir: Path | None  # None for an external cluster

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [self.kubectl_path, f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}"
            )
        return proc

    def apply(self, namespace: str, document: str) -> subprocess.CompletedProcess[str]:
        """`kubectl apply -n NAMESPACE -f -` of a YAML or JSON document, as a user types it."""
        return self.kubectl("apply", "-n", namespace, "-f", "-", input=document)


def _fresh_cluster(cls: type[LocalCluster]) -> LocalCluster:
    lc = cls(Path(tempfile.mkdtemp(prefix="medforge-test-cluster-")))
    try:
        lc.up(log=False)
    except BaseException:
        with contextlib.suppress(Exception):  # the start's error is the one to report
            lc.down(purge=True)
        raise
    return lc


def start_local_cluster(cls: type[LocalCluster]) -> LocalCluster:
    """A fresh local cluster in its own state directory. One failed start (a port taken between
    choosing and binding it, a component slow on a loaded machine) is retried once on fresh
    ports, with a warning that carries the first error; a second failure fails the tests."""
    try:
        return _fresh_cluster(cls)
    except Exception as first:
        warnings.warn(f"the local cluster failed to start, trying once more: {first}", stacklevel=1)
        try:
            return _fresh_cluster(cls)
        except Exception as exc:
            raise RuntimeError(
                f"the local cluster failed to start twice; the first time: {first}"
            ) from exc


@pytest.fixture(scope="session")
def cluster() -> Iterator[ClusterAccess]:
    if external := os.environ.get("MEDFORGE_TEST_KUBECONFIG"):
        yield ClusterAccess(
            Path(external),
            shutil.which("kubectl") or "kubectl",
            os.environ["MEDFORGE_TEST_S3_ENDPOINT"],
            os.environ["MEDFORGE_TEST_S3_ACCESS_KEY"],
            os.environ["MEDFORGE_TEST_S3_SECRET_KEY"],
            None,
        )
        return
    from medforge_localcluster.cluster import LocalCluster

    lc = start_local_cluster(LocalCluster)
    try:
        creds = lc.s3_credentials()
        yield ClusterAccess(
            lc.kubeconfig,
            str(lc.kubectl()),
            lc.s3_endpoint(),
            creds["access_key"],
            creds["secret_key"],
            lc.dir,
        )
    finally:
        lc.down(purge=True)


@pytest.fixture
def namespace(cluster: ClusterAccess, request: pytest.FixtureRequest) -> Iterator[str]:
    base = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    name = f"{base}-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    # A MedForge member namespace: the operator creates Jobs only in those.
    cluster.kubectl("label", "namespace", name, "medforge.io/member=true")
    # Pods need the namespace's default ServiceAccount, which a controller creates.
    for _ in range(100):
        if (
            cluster.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode
            == 0
        ):
            break
        import time

        time.sleep(0.1)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@dataclass(frozen=True)
class Bucket:
    name: str
    endpoint: str
    access_key: str
    secret_key: str
    client: Any


@pytest.fixture
def s3_bucket(cluster: ClusterAccess) -> Iterator[Bucket]:
    from medforge_localcluster.s3 import client

    s3 = client(cluster.s3_endpoint, cluster.s3_access_key, cluster.s3_secret_key)
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    yield Bucket(name, cluster.s3_endpoint, cluster.s3_access_key, cluster.s3_secret_key, s3)
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
        for obj in page.get("Contents", []):
            s3.delete_object(Bucket=name, Key=obj["Key"])
    s3.delete_bucket(Bucket=name)
