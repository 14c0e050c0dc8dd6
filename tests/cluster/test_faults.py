"""Faults are retried, never verdicts: results survive their pods, a Job deleted by hand is made
again, a restarted operator picks up where it was. Each test counts what it injected and what
was lost (nothing)."""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest

from tests.cluster.conftest import Forge, OperatorProcess, base_model
from tests.cluster.test_operator import condition, contribution, status, wait_phase
from tests.conftest import ClusterAccess
from tests.helpers import get_json, wait_until

pytestmark = pytest.mark.usefixtures("operator")


@pytest.fixture(scope="module")
def base(cluster: ClusterAccess, forge: Forge, operator: OperatorProcess) -> tuple[str, str]:
    return base_model(cluster, forge, "clip-faults")


def test_a_result_outlives_its_pods(
    cluster: ClusterAccess, namespace: str, base: tuple[str, str], operator: OperatorProcess
) -> None:
    """The Job completes while the operator is down and its pods are deleted (pod GC, a node
    scaled down) before it comes back: the artifact is recovered from the store's manifest."""
    cluster.apply(namespace, contribution("gc", base, task="slow-3"))

    def training() -> dict[str, Any] | None:
        st = status(cluster, "lorac", namespace, "gc")
        return st if condition(st, "Ready").get("reason") in ("Training", "JobCreated") else None

    wait_until(training, 60, what="the training Job")
    operator.stop(signal.SIGKILL)
    try:
        cluster.kubectl(
            "wait",
            "--for=condition=complete",
            "job/gc-train-g1",
            "-n",
            namespace,
            "--timeout=60s",
        )
        cluster.kubectl("delete", "pods", "-n", namespace, "-l", "job-name=gc-train-g1")
        wait_until(
            lambda: not get_json(cluster, "pods", "-n", namespace)["items"],
            30,
            what="the pods to be gone",
        )
    finally:
        operator.start()
    st = wait_phase(cluster, namespace, "gc", "Succeeded", 120)
    assert condition(st, "ArtifactVerified")["status"] == "True"
    assert st["artifact"]["digest"].startswith("sha256:") and st["artifact"]["files"]


def test_a_job_deleted_by_hand_is_made_again(
    cluster: ClusterAccess, namespace: str, base: tuple[str, str]
) -> None:
    cluster.apply(namespace, contribution("oops", base, task="slow-20"))
    wait_until(
        lambda: (
            cluster.kubectl("get", "job", "oops-train-g1", "-n", namespace, check=False).returncode
            == 0
        ),
        60,
        what="the first Job",
    )
    first = get_json(cluster, "job", "oops-train-g1", "-n", namespace)["metadata"]["uid"]
    time.sleep(1)
    cluster.kubectl("delete", "job", "oops-train-g1", "-n", namespace, "--wait=true")

    def recreated() -> str | None:
        out = cluster.kubectl(
            "get", "job", "oops-train-g1", "-n", namespace, "-o", "json", check=False
        )
        if out.returncode != 0:
            return None
        uid = get_json(cluster, "job", "oops-train-g1", "-n", namespace)["metadata"]["uid"]
        return uid if uid != first else None

    wait_until(recreated, 60, what="a new Job for the same generation")
    st = wait_phase(cluster, namespace, "oops", "Succeeded", 120)
    assert st["phase"] == "Succeeded"  # the user's deletion was a fault, not a verdict
