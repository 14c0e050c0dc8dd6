"""What the operator benchmarks share: a local cluster with the CRDs, the forge bucket's
access and member namespaces, and a process's peak memory."""

from __future__ import annotations

from pathlib import Path

from medforge_localcluster.cluster import LocalCluster
from tests.cluster.conftest import Forge
from tests.conftest import ClusterAccess

ROOT = Path(__file__).resolve().parents[1]


def prepare(lc: LocalCluster, state: Path, spaces: list[str]) -> tuple[ClusterAccess, Forge]:
    """The started cluster's access, its CRDs established, `spaces` as member namespaces."""
    creds = lc.s3_credentials()
    access = ClusterAccess(
        lc.kubeconfig,
        str(lc.kubectl()),
        lc.s3_endpoint(),
        creds["access_key"],
        creds["secret_key"],
        state,
    )
    access.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
    access.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
    forge = Forge("medforge", lc.s3_endpoint(), creds["access_key"], creds["secret_key"])
    for ns in spaces:
        access.kubectl("create", "namespace", ns)
        access.kubectl("label", "namespace", ns, "medforge.io/member=true")
    return access, forge


def peak_rss_mib(pid: int) -> float:
    """VmHWM: the process's peak resident memory so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")
