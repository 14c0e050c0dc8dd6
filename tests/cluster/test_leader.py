"""Two operator replicas: one leads (a coordination.k8s.io Lease), the other stands by; when the
leader is killed, the standby takes over within 30 s and nothing is done twice."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.builders import contribution
from tests.cluster.conftest import Forge, OperatorProcess, base_model
from tests.cluster.test_operator import wait_phase
from tests.conftest import ClusterAccess
from tests.helpers import get_json, wait_until


@pytest.fixture
def replicas(
    cluster: ClusterAccess, crds: None, forge: Forge, operator: OperatorProcess, tmp_path: Path
) -> Iterator[list[OperatorProcess]]:
    operator.stop()  # the shared operator hands its Lease on as it stops
    ops = [
        OperatorProcess(cluster, forge, tmp_path / f"replica-{i}.log", HOSTNAME=f"replica-{i}")
        for i in range(2)
    ]
    for op in ops:
        op.start()
    yield ops
    for op in ops:
        op.stop()
    operator.start()


def holder(cluster: ClusterAccess) -> str:
    out = cluster.kubectl(
        "get", "lease", "medforge-operator", "-n", "default", "-o", "json", check=False
    )
    if out.returncode != 0:
        return ""
    return str((json.loads(out.stdout).get("spec") or {}).get("holderIdentity") or "")


def test_the_standby_takes_over_when_the_leader_dies(
    cluster: ClusterAccess, namespace: str, forge: Forge, replicas: list[OperatorProcess]
) -> None:
    def leading(other_than: str = "") -> str | None:
        h = holder(cluster)
        return h if h.startswith("replica-") and h != other_than else None

    lead = wait_until(leading, 60)
    leader = replicas[int(lead.split("_")[0].removeprefix("replica-"))]
    standby = next(op for op in replicas if op is not leader)
    base = base_model(cluster, forge, "clip-leader")
    cluster.apply(namespace, contribution("before", base))
    wait_phase(cluster, namespace, "before", "Succeeded", 90)
    assert "became the leader" not in standby.log.read_text()  # the standby did nothing

    leader.stop(signal.SIGKILL)  # no chance to hand the Lease on
    died = time.monotonic()
    cluster.apply(namespace, contribution("after", base))
    new = wait_until(lambda: leading(lead), 45, every=0.5)
    took_over = time.monotonic() - died
    assert took_over < 30, took_over
    assert new.split("_")[0] != lead.split("_")[0]
    wait_phase(cluster, namespace, "after", "Succeeded", 90)
    jobs = get_json(cluster, "jobs", "-n", namespace)["items"]
    assert sorted(j["metadata"]["name"] for j in jobs) == ["after-train-g1", "before-train-g1"]
    assert "became the leader" in standby.log.read_text()
