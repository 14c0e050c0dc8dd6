"""Fixtures of the image tests (`make test-images`): a local cluster whose kubelet runs in
container mode, from the OCI layout `make images` wrote."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ClusterAccess, start_local_cluster

ROOT = Path(__file__).resolve().parents[2]
LAYOUT = ROOT / "build" / "images" / "oci"


@pytest.fixture(scope="session")
def built() -> dict[str, str]:
    """Reference -> manifest digest of every image in the layout."""
    index = LAYOUT / "index.json"
    if not index.is_file():
        pytest.fail(f"{index} is missing: run `make images` (make test-images does)")
    doc = json.loads(index.read_text())
    return {m["annotations"]["io.containerd.image.name"]: m["digest"] for m in doc["manifests"]}


@pytest.fixture(scope="session")
def image_cluster(built: dict[str, str]) -> Iterator[ClusterAccess]:
    from medforge_localcluster.cluster import LocalCluster

    saved = {k: os.environ.get(k) for k in ("MEDFORGE_KUBELET_RUNTIME", "MEDFORGE_KUBELET_IMAGES")}
    os.environ["MEDFORGE_KUBELET_RUNTIME"] = "container"
    os.environ["MEDFORGE_KUBELET_IMAGES"] = str(LAYOUT)
    try:
        lc = start_local_cluster(LocalCluster)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
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
