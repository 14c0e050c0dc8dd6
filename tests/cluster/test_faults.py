"""Faults are retried, never verdicts: results survive their pods, a Job deleted by hand is made
again, a restarted operator picks up where it was. Each test counts what it injected and what
was lost (nothing)."""

from __future__ import annotations

import json
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from medforge_common.manifest import digest_of
from medforge_localcluster.cluster import LocalCluster
from medforge_localcluster.s3 import client
from tests.builders import contribution
from tests.cluster.conftest import Forge, OperatorProcess, base_model
from tests.cluster.test_composite import composite_doc
from tests.cluster.test_operator import condition, status, wait_phase
from tests.conftest import ClusterAccess
from tests.helpers import get_json, wait_until

pytestmark = pytest.mark.usefixtures("operator")


def forge_composite(base: tuple[str, str], **spec: Any) -> str:
    """The forge's composite `forge`, over the test's labelled contributions."""
    return composite_doc(base, None, **spec)


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


@pytest.fixture
def local(cluster: ClusterAccess) -> Iterator[LocalCluster]:
    """The local cluster itself, to stop and start its S3 server (a store outage)."""
    if cluster.state_dir is None:
        pytest.skip("stopping the store needs the local cluster, not an external one")
    lc = LocalCluster(cluster.state_dir)
    yield lc
    if not lc.running().get("s3"):
        lc.start_s3()  # never leave the store down for the tests that follow


def test_store_outages_during_uploads_and_downloads_are_survived(
    cluster: ClusterAccess,
    namespace: str,
    forge_namespace: str,
    forge: Forge,
    base: tuple[str, str],
    local: LocalCluster,
) -> None:
    """The S3 server stops while a contribution trains (its upload meets the outage) and while
    a merge Job downloads its inputs; both retry and finish once it is back. Counted: faults
    injected, survived, artifacts lost."""
    injected = survived = lost = 0
    doc = json.loads(contribution("outage", base, task="slow-3"))
    doc["spec"]["sharing"] = {"forges": [f"{forge_namespace}/forge"]}
    cluster.apply(namespace, json.dumps(doc))

    def training() -> dict[str, Any] | None:
        st = status(cluster, "lorac", namespace, "outage")
        return st if condition(st, "Ready").get("reason") == "Training" else None

    wait_until(training, 60, what="training")
    local.stop_s3()
    injected += 1
    time.sleep(6)  # the upload (and the operator's verification) meet the outage
    local.start_s3()
    st = wait_phase(cluster, namespace, "outage", "Succeeded", 120)
    survived += 1
    s3 = client(forge.endpoint, forge.access_key, forge.secret_key)
    key = st["artifact"]["uri"].split(f"{forge.bucket}/", 1)[1] + "manifest.json"
    body = s3.get_object(Bucket=forge.bucket, Key=key)["Body"].read()
    lost += st["artifact"]["digest"] != digest_of(body)

    # A merge whose inputs are fetched while the store is down.
    doc = json.loads(contribution("merge-outage", base, task="slow-merge-3"))
    doc["spec"]["sharing"] = {"forges": [f"{forge_namespace}/forge"]}
    cluster.apply(namespace, json.dumps(doc))
    wait_phase(cluster, namespace, "merge-outage", "Succeeded", 90)
    cluster.apply(
        forge_namespace, forge_composite(base, minContributions=2, strategy={"type": "linear"})
    )

    def merging() -> dict[str, Any] | None:
        st = status(cluster, "cmodel", forge_namespace, "forge")
        return st if st.get("phase") == "Merging" else None

    wait_until(merging, 60, what="the merge Job")
    local.stop_s3()
    injected += 1
    time.sleep(6)
    local.start_s3()

    def accepted() -> dict[str, Any] | None:
        st = status(cluster, "cmodel", forge_namespace, "forge")
        return st if (st.get("current") or {}).get("inputCount") == 2 else None

    st = wait_until(accepted, 180, what="the revision after the outage")
    survived += 1
    assert "excluded" not in st or not st["excluded"], st["excluded"]  # a fault, no verdict
    print(f"store outages: injected {injected}, survived {survived}, artifacts lost {lost}")
    assert (injected, survived, lost) == (2, 2, 0)


@pytest.fixture
def lone_operator(
    cluster: ClusterAccess, forge: Forge, operator: OperatorProcess, tmp_path: Path
) -> Iterator[OperatorProcess]:
    """One operator without leader election (a killed leader's Lease would hold its successor
    back for 15 s: the kills below are meant to land mid-round); the shared one pauses."""
    operator.stop()
    op = OperatorProcess(cluster, forge, tmp_path / "lone.log", MEDFORGE_LEADER_ELECTION="false")
    op.start()
    yield op
    op.stop()
    operator.start()


def test_the_operator_killed_anywhere_in_the_revision_path_loses_nothing(
    cluster: ClusterAccess,
    namespace: str,
    forge_namespace: str,
    base: tuple[str, str],
    lone_operator: OperatorProcess,
) -> None:
    """Ten SIGKILLs at random moments while six contributions train and merge revision after
    revision: afterwards every contribution is merged, each revision had exactly one Job, and
    the composite's history has no gap."""
    operator = lone_operator
    rng = random.Random(12)
    cluster.apply(
        forge_namespace, forge_composite(base, strategy={"type": "linear"}, historyLimit=100)
    )
    kills = 0
    for i in range(6):
        doc = json.loads(contribution(f"site-{i}", base, task=f"task-{i}"))
        doc["spec"]["sharing"] = {"forges": [f"{forge_namespace}/forge"]}
        cluster.apply(namespace, json.dumps(doc))
        for _ in range(2 if i < 4 else 1):
            time.sleep(rng.uniform(0.2, 2.5))
            operator.stop(signal.SIGKILL)
            kills += 1
            operator.start()
    assert kills == 10

    def all_merged() -> dict[str, Any] | None:
        st = status(cluster, "cmodel", forge_namespace, "forge")
        included = [i for i in st.get("inputs") or [] if i.get("state") == "Included"]
        return st if len(included) == 6 and "pendingRevision" not in st else None

    st = wait_until(all_merged, 300, every=1, what="all six contributions merged")
    revisions = [h["revision"] for h in st["history"]]
    assert sorted(revisions) == list(range(1, max(revisions) + 1)), revisions  # no gap
    assert all(h["state"] == "Accepted" for h in st["history"]), st["history"]
    jobs = get_json(cluster, "jobs", "-n", forge_namespace)["items"]
    names = [j["metadata"]["name"] for j in jobs]
    assert sorted(names) == sorted(f"forge-merge-r{r}" for r in revisions)  # one Job each
    train = get_json(cluster, "jobs", "-n", namespace)["items"]
    assert sorted(j["metadata"]["name"] for j in train) == [f"site-{i}-train-g1" for i in range(6)]
    print(f"operator kills: injected {kills}, revisions {len(revisions)}, contributions lost 0")


def test_a_poisoned_input_is_a_verdict_and_the_next_revision_goes_on(
    cluster: ClusterAccess, namespace: str, forge_namespace: str, base: tuple[str, str]
) -> None:
    """The merger refuses the only input (a poisoned manifest): a verdict, so the Job fails at
    once (no retry), the input is excluded with the merger's reason told to its owner, and a
    good contribution after it is merged."""
    cluster.apply(forge_namespace, forge_composite(base, strategy={"type": "linear"}))
    for name, task in (("poisoned", "reject-me"), ("good", "lung")):
        doc = json.loads(contribution(name, base, task=task))
        doc["spec"]["sharing"] = {"forges": [f"{forge_namespace}/forge"]}
        cluster.apply(namespace, json.dumps(doc))
        wait_phase(cluster, namespace, name, "Succeeded", 90)

        def settled(name: str = name) -> dict[str, Any] | None:
            st = status(cluster, "cmodel", forge_namespace, "forge")
            inputs = {i["name"]: i for i in st.get("inputs") or []}
            return st if inputs.get(name, {}).get("state") in ("Included", "Excluded") else None

        st = wait_until(settled, 120, what=f"{name} merged or excluded")
        if name == "poisoned":
            poisoned = next(i for i in st["inputs"] if i["name"] == "poisoned")
            assert (poisoned["state"], poisoned["reason"]) == ("Excluded", "ExcludedByMerger")
            assert st["history"][0]["state"] == "Rejected" and "retry" not in st
            accepted = condition(st, "Accepted")
            assert accepted["status"] == "False" and accepted["reason"] == "NoUsableInput"
            job = get_json(cluster, "job", "forge-merge-r1", "-n", forge_namespace)
            assert job["status"].get("failed") == 1  # the verdict is not retried
            events = cluster.kubectl(
                "get", "events", "-n", namespace, "--field-selector", "involvedObject.name=poisoned"
            ).stdout
            assert "ExcludedByMerger" in events and "meta.rank" in events
    assert st["current"]["inputCount"] == 1 and st["current"]["inputs"][0]["name"] == "good"


def test_a_malformed_manifest_is_a_clear_verdict(
    cluster: ClusterAccess, namespace: str, base: tuple[str, str], operator: OperatorProcess
) -> None:
    """A manifest whose meta is a list and which lists a file twice (its digest as reported):
    InvalidManifest on the status, and no traceback in the operator's log."""
    start = operator.log.stat().st_size
    cluster.apply(namespace, contribution("hostile", base, task="bad-manifest"))
    st = wait_phase(cluster, namespace, "hostile", "Failed", 90)
    verified = condition(st, "ArtifactVerified")
    assert verified["status"] == "False" and verified["reason"] == "InvalidManifest"
    assert "listed twice" in verified["message"] or "meta must be" in verified["message"]
    with operator.log.open("rb") as f:
        f.seek(start)
        assert b"Traceback" not in f.read()


def test_an_input_that_breaks_every_merge_is_isolated_and_the_others_merge(
    cluster: ClusterAccess, namespace: str, forge_namespace: str, base: tuple[str, str]
) -> None:
    """Three contributions arrive together; one makes the merge fail as a whole (the stand-in
    merger crashes whenever it is among its inputs, as tensors that exhaust memory would). After
    two failed attempts its new inputs are tried in halves: the culprit is excluded
    (IsolatedAfterFailures, an Event in its own namespace), the two others land in an accepted
    revision."""
    cluster.apply(
        forge_namespace,
        forge_composite(base, strategy={"type": "linear"}, minContributions=3),
    )
    for name, task in (("first", "breakhis"), ("culprit", "crash-merge"), ("last", "lung")):
        doc = json.loads(contribution(name, base, task=task))
        doc["spec"]["sharing"] = {"forges": [f"{forge_namespace}/forge"]}
        cluster.apply(namespace, json.dumps(doc))
    for name in ("first", "culprit", "last"):
        wait_phase(cluster, namespace, name, "Succeeded", 90)
    t0 = time.monotonic()

    def settled() -> dict[str, Any] | None:
        st = status(cluster, "cmodel", forge_namespace, "forge")
        states = {i["name"]: (i["state"], i["reason"]) for i in st.get("inputs") or []}
        done = states.get("culprit", ("",))[0] == "Excluded"
        merged = [states.get(n, ("",))[0] == "Included" for n in ("first", "last")]
        return st if done and all(merged) else None

    st = wait_until(settled, 240, what="the culprit isolated")
    waited = time.monotonic() - t0
    states = {i["name"]: (i["state"], i["reason"]) for i in st["inputs"]}
    assert states == {
        "first": ("Included", "Merged"),
        "last": ("Included", "Merged"),
        "culprit": ("Excluded", "IsolatedAfterFailures"),
    }
    assert condition(st, "Ready")["status"] == "True"
    assert "isolation" not in st and "retry" not in st
    # All three twice; then the halves, in arrival order: a half that fails is split, a good
    # one lands, the culprit alone fails twice. At most 7 Jobs for three inputs (the bound in
    # medforge_operator.isolation).
    runs = [h["state"] for h in reversed(st["history"])]
    assert runs[:2] == ["Failed", "Failed"]
    trace = [(h["revision"], h["state"], h.get("message", "")[:90]) for h in st["history"]]
    assert runs.count("Failed") in (4, 5) and 1 <= runs.count("Accepted") <= 2, trace
    assert len(runs) <= 7 and st["current"]["inputCount"] == 2
    events = get_json(
        cluster, "events", "-n", namespace, "--field-selector=involvedObject.name=culprit"
    )["items"]
    assert any(e["reason"] == "IsolatedAfterFailures" for e in events)
    print(f"good inputs merged {waited:.0f} s after all three were Ready")
