"""The operator's pure logic: names, conditions, Job manifests, status, input selection, gate."""

from __future__ import annotations

import json
from typing import Any

import pytest

from medforge_common import strategy
from medforge_common.uris import S3Uri
from medforge_operator import basemodel, composite, contribution, datajob, jobs, jobstatus, names
from medforge_operator.conditions import Cond, merge_conditions
from medforge_operator.settings import Settings, SettingsError, load
from medforge_operator.store import ForgeStore
from tests.builders import lorac

SETTINGS = Settings("http://s3", "forge", "ak", "sk")
DIGEST = "sha256:" + "a" * 64
BASE = basemodel.Resolved(
    "clip", DIGEST, S3Uri("forge", "base-models/clip/"), ("manifest.json", "config.json")
)


def test_job_names_are_deterministic_and_fit() -> None:
    assert names.training_job_name("breakhis", 3) == "breakhis-train-g3"
    long = names.training_job_name("x" * 80, 12)
    assert len(long) <= 63 and long.endswith("-train-g12")
    assert long == names.training_job_name("x" * 80, 12)
    assert long != names.training_job_name("x" * 79 + "y", 12)


def test_conditions_keep_transition_time_until_status_flips() -> None:
    first = merge_conditions(None, [Cond("Ready", False, "Training")], 1, at="t1")
    same = merge_conditions(first, [Cond("Ready", False, "Verifying")], 1, at="t2")
    assert same[0]["lastTransitionTime"] == "t1" and same[0]["reason"] == "Verifying"
    flipped = merge_conditions(same, [Cond("Ready", True, "Verified")], 1, at="t3")
    assert flipped[0]["lastTransitionTime"] == "t3" and flipped[0]["status"] == "True"


def test_training_job_is_restricted_and_carries_the_contract() -> None:
    obj = lorac(
        resources={
            "gpus": 2,
            "nodeSelector": {"gpu": "a100"},
            "queueName": "research",
            "tolerations": [{"key": "gpu", "operator": "Exists"}],
            "priorityClassName": "high",
        },
        dataset={"uri": "s3://data/x/", "credentialsSecretRef": {"name": "creds"}},
    )
    job = contribution.training_job(obj, SETTINGS, BASE)
    assert job["metadata"]["name"] == "breakhis-train-g1"
    assert (
        job["metadata"]["labels"][jobs.KUEUE_QUEUE] == "research" and job["spec"]["suspend"] is True
    )
    pod = job["spec"]["template"]["spec"]
    assert (
        pod["securityContext"]["runAsNonRoot"]
        and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    )
    assert pod["automountServiceAccountToken"] is False
    assert pod["nodeSelector"] == {"gpu": "a100"} and pod["priorityClassName"] == "high"
    c = pod["containers"][0]
    assert c["command"] == ["medforge-train"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e}
    assert refs["DATASET_AWS_SECRET_ACCESS_KEY"] == {
        "name": "creds",
        "key": "AWS_SECRET_ACCESS_KEY",
    }


def test_pvc_dataset_is_mounted_read_only() -> None:
    cfg, env, volumes, mounts = datajob.dataset_wiring(
        lorac(dataset={"uri": "pvc://scans/breakhis/v2"})["spec"]
    )
    assert volumes == [
        {"name": "dataset", "persistentVolumeClaim": {"claimName": "scans", "readOnly": True}}
    ]
    assert mounts[0]["readOnly"] is True and cfg["path"] == "/data/breakhis/v2" and env == []


def pod(
    phase: str, waiting: str = "", message: str = "", code: int | None = None
) -> dict[str, Any]:
    state: dict[str, Any] = {}
    if waiting:
        state = {"waiting": {"reason": waiting, "message": message}}
    if code is not None:
        state = {"terminated": {"exitCode": code, "message": message}}
    return {
        "metadata": {"name": "p", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "status": {"phase": phase, "containerStatuses": [{"state": state}]},
    }


def test_status_for_a_missing_secret_a_failure_and_a_success() -> None:
    job = {"status": {"active": 1}}
    o = contribution.Observation(
        1, "j", job, [pod("Pending", "CreateContainerConfigError", 'secret "s" not found')]
    )
    st = contribution.compute_status({}, o)
    stalled = next(c for c in st["conditions"] if c["type"] == "Stalled")
    assert (
        st["phase"] == "Pending"
        and stalled["status"] == "True"
        and 'secret "s"' in stalled["message"]
    )

    failed = {
        "status": {
            "failed": 3,
            "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}],
        }
    }
    o = contribution.Observation(
        1, "j", failed, [pod("Failed", code=1, message="class mismatch: tumour")]
    )
    st = contribution.compute_status({}, o)
    assert st["phase"] == "Failed" and "class mismatch" in st["conditions"][0]["message"]

    done = {"status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}}
    o = contribution.Observation(
        1, "j", done, [], verified={"artifact": {"digest": DIGEST}, "metrics": {"accuracy": 0.9}}
    )
    st = contribution.compute_status({}, o)
    assert st["phase"] == "Succeeded" and st["metrics"]["accuracy"] == 0.9
    assert all(
        c["status"] == ("False" if c["type"] in ("Reconciling", "Stalled") else "True")
        for c in st["conditions"]
    )


def test_selector_strings() -> None:
    sel = {
        "matchLabels": {"a": "1"},
        "matchExpressions": [
            {"key": "tier", "operator": "In", "values": ["x", "y"]},
            {"key": "gone", "operator": "DoesNotExist"},
        ],
    }
    assert composite.selector_string(sel) == "a=1,tier in (x,y),!gone"


def ready_contribution(
    ns: str, name: str, digest: str, base: str = DIGEST, since: str = "t1"
) -> dict[str, Any]:
    return {
        "metadata": {"namespace": ns, "name": name, "generation": 1, "uid": f"u-{name}"},
        "status": {
            "observedGeneration": 1,
            "phase": "Succeeded",
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": since}],
            "artifact": {
                "digest": digest,
                "baseModelDigest": base,
                "uri": f"s3://b/verified/contributions/{ns}/{name}/u-{name}/"
                f"{digest.removeprefix('sha256:')}/",
            },
        },
    }


def test_inputs_and_revision_plan() -> None:
    comp: dict[str, Any] = {
        "metadata": {"name": "f", "namespace": "forge", "uid": "cu"},
        "spec": {
            "baseModel": {"digest": DIGEST},
            "minContributions": 2,
            "integration": "incremental",
        },
        "status": {},
    }
    a = ready_contribution("h1", "a", "sha256:1", since="t2")
    b = ready_contribution("h2", "b", "sha256:2", since="t1")
    other = ready_contribution("h3", "c", "sha256:3", base="sha256:" + "b" * 64)
    inputs, candidates = composite.evaluate_inputs(comp, [a, b, other], DIGEST)
    assert [c["metadata"]["name"] for c in candidates] == ["b", "a"]  # arrival order
    assert next(i for i in inputs if i["name"] == "c")["reason"].startswith("BaseModelMismatch")
    plan = composite.plan_revision(comp, candidates, [a, b, other])
    assert plan is not None and plan.revision == 1 and len(plan.all_inputs) == 2
    assert composite.plan_revision(comp, candidates[:1], [a]) is None  # below minContributions
    comp["spec"]["paused"] = True
    assert composite.plan_revision(comp, candidates, [a, b]) is None


def test_gate_compares_with_the_operators_own_record_of_the_previous_revision() -> None:
    previous = {"lung": {"accuracy": 0.9, "samples": 200, "classes": 2}}
    ok, _ = composite.gate({"metrics": {"lung": {"accuracy": 0.88, "samples": 200}}}, previous, {})
    assert ok
    bad = {"metrics": {"lung": {"accuracy": 0.6, "samples": 200, "classes": 2}}}
    ok, why = composite.gate(bad, previous, {"maxRegression": 0.05})
    assert not ok and "task lung regressed by 0.300" in why
    # What the merger claims the previous figures were does not count.
    assert composite.gate({**bad, "regression": {"lung": 0.0}}, previous, {})[0] is False
    # A result's figures are checked, not trusted: no exception in a round.
    assert composite.gate({"metrics": {"lung": {"accuracy": "x"}}}, previous, {})[0]
    assert composite.gate({"metrics": ["lung"]}, previous, {})[0]


def test_settings_from_env_and_flags() -> None:
    env = {
        "MEDFORGE_STORE_ENDPOINT": "http://s3",
        "MEDFORGE_STORE_BUCKET": "forge",
        "AWS_ACCESS_KEY_ID": "AKIA-test-key-id",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
        "MEDFORGE_NAMESPACES": "h1, h2",
        "MEDFORGE_TRAINER_COMMAND": json.dumps(["python", "-m", "t"]),
    }
    s = load(["--concurrency", "4"], env)
    assert (
        s.namespaces == ("h1", "h2")
        and s.concurrency == 4
        and s.trainer_command == ("python", "-m", "t")
    )
    assert s.store_secret_key == "s3cr3t-value"  # read, so a leak would show below
    assert "s3cr3t-value" not in repr(s) and "s3cr3t-value" not in str(s)  # never in logs
    with pytest.raises(SettingsError, match="MEDFORGE_STORE_BUCKET"):
        load([], {"MEDFORGE_STORE_ENDPOINT": "http://s3"})
    with pytest.raises(SettingsError, match="PRESIGN_EXPIRY"):
        load(["--presign-expiry-seconds", "10"], env)


def test_store_keys_may_come_from_the_pods_identity_but_not_half_of_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No static keys: boto3's default chain (IRSA, EKS Pod Identity, an instance profile)."""
    env = {"MEDFORGE_STORE_ENDPOINT": "https://s3", "MEDFORGE_STORE_BUCKET": "forge"}
    s = load([], env)
    assert s.store_access_key == "" and s.store_secret_key == ""
    # Whatever the chain finds (here its environment provider) signs the URLs.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ASIA-from-the-chain")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "chain-secret")
    url = ForgeStore(s).presign_get(S3Uri("forge", "a/b"), 600)
    assert "ASIA-from-the-chain" in url
    with pytest.raises(SettingsError, match="MEDFORGE_STORE_SECRET_ACCESS_KEY"):
        load([], env | {"MEDFORGE_STORE_ACCESS_KEY_ID": "AKIA-only-half"})


def test_reported_figures_keep_finite_numbers_only() -> None:
    meta = {
        "imagesPerSecond": 812.5,
        "seconds": float("inf"),
        "loss": True,
        "epochs": 3,
        "device": "cuda; rm -rf /",
        "extra": 1,
    }
    assert contribution.training_figures(meta) == {"imagesPerSecond": 812.5, "epochs": 3}
    assert contribution.training_figures({"epochs": 3.5, "batchSize": "32"}) == {}
    assert contribution.training_figures(["not", "a", "dict"]) == {}
    assert composite.merge_figures({"seconds": 4.5, "searchEvaluations": 80}) == {
        "mergeSeconds": 4.5,
        "searchEvaluations": 80,
    }
    assert composite.merge_figures({"seconds": -1, "searchEvaluations": "many"}) == {}
    assert composite.merge_figures(None) == {}


def test_merge_config_passes_previous_metrics_in_both_modes() -> None:
    current = {"revision": 3, "digest": "sha256:c", "metrics": {"lung": {"accuracy": 0.9}}}
    comp: dict[str, Any] = {
        "metadata": {"name": "f", "namespace": "forge", "uid": "cu"},
        "spec": {"baseModel": {"digest": DIGEST}, "integration": "full"},
        "status": {"current": current},
    }
    current |= {
        "uri": "s3://b/verified/composites/forge/f/cu/rev-3/",
        "files": ["adapter.safetensors"],
    }
    plan = composite.Plan(4, [], [])
    uri = composite.output_prefix("b", comp, 4)
    full = composite.merge_plan(comp, plan, BASE, uri, "b")
    assert full["previous"] == {"revision": 3, "metrics": current["metrics"]}
    assert full["integration"] == "full" and "current" not in full
    comp["spec"]["integration"] = "incremental"
    inc = composite.merge_plan(comp, plan, BASE, uri, "b")
    assert inc["integration"] == "incremental"
    assert inc["current"]["files"] == [
        {
            "name": "manifest.json",
            "get": "s3://b/verified/composites/forge/f/cu/rev-3/manifest.json",
        },
        {
            "name": "adapter.safetensors",
            "get": "s3://b/verified/composites/forge/f/cu/rev-3/adapter.safetensors",
        },
    ]
    assert inc["previous"]["metrics"] == current["metrics"]
    assert "tasks.safetensors" in composite.OUTPUT_FILES
    assert "head.safetensors" in contribution.OUTPUT_FILES


def test_a_finished_pod_before_the_job_completes_is_still_training() -> None:
    pod = {
        "metadata": {"name": "p", "creationTimestamp": "t1"},
        "status": {
            "phase": "Succeeded",
            "containerStatuses": [{"state": {"terminated": {"exitCode": 0, "message": "{}"}}}],
        },
    }
    job = {"metadata": {"name": "j"}, "status": {"active": 0}}
    o = contribution.Observation(generation=1, job_name="j", job=job, pods=[pod])
    st = contribution.compute_status({}, o)
    assert st["phase"] == "Training"
    o = contribution.Observation(generation=1, job_name="j", job=job, pods=[])
    assert contribution.compute_status({}, o)["phase"] == "Pending"


def test_dense_strategies_always_merge_in_full() -> None:
    current = {"revision": 1, "digest": "sha256:c", "inputs": [], "metrics": {}}
    comp: dict[str, Any] = {
        "metadata": {"name": "f", "namespace": "forge", "uid": "cu"},
        "spec": {"baseModel": {"digest": DIGEST}, "strategy": {"type": "ties"}},
        "status": {"current": current},
    }
    assert composite.effective_integration(comp["spec"]) == "full"
    uri = composite.output_prefix("b", comp, 2)
    cfg = composite.merge_plan(comp, composite.Plan(2, [], []), BASE, uri, "b")
    assert cfg["integration"] == "full" and "current" not in cfg  # dense deltas are not factors
    comp["spec"]["strategy"] = {"type": "svd", "rank": 4}
    assert composite.effective_integration(comp["spec"]) == "incremental"


def test_only_a_queued_job_that_never_started_skips_the_pod_listing() -> None:
    queued = {"spec": {"suspend": True}, "status": {"conditions": [{"type": "Suspended"}]}}
    assert jobstatus.never_started(queued)
    # Not suspended, or suspended with pods that ran or still run: its pods tell the attempts.
    assert not jobstatus.never_started({"spec": {"suspend": False}, "status": {"active": 1}})
    assert not jobstatus.never_started({"spec": {}, "status": {}})
    for ran in ({"failed": 1}, {"startTime": "2026-11-26T00:00:00Z"}, {"terminating": 1}):
        assert not jobstatus.never_started({"spec": {"suspend": True}, "status": ran})


def test_only_job_events_that_can_change_the_owner_queue_a_round() -> None:
    suspended = {"conditions": [{"type": "Suspended", "status": "True"}]}

    def job(generation: int, suspend: bool, status: dict[str, Any]) -> dict[str, Any]:
        return {
            "metadata": {"generation": generation},
            "spec": {"suspend": suspend},
            "status": status,
        }

    # As we created it: no status yet, or queued for Kueue and never admitted.
    assert not jobstatus.worth_a_round("ADDED", job(1, True, {}))
    assert not jobstatus.worth_a_round("MODIFIED", job(1, True, suspended))
    # Admitted (unsuspended: a spec change), running, suspended again, or gone.
    assert jobstatus.worth_a_round("MODIFIED", job(2, False, suspended))
    assert jobstatus.worth_a_round("MODIFIED", job(2, False, {"active": 1, "startTime": "t"}))
    assert jobstatus.worth_a_round("MODIFIED", job(3, True, suspended))
    assert jobstatus.worth_a_round("DELETED", job(1, True, {}))
    # Not queued at all: its first status already reports a started pod.
    assert jobstatus.worth_a_round("MODIFIED", job(1, False, {"active": 1, "startTime": "t"}))


def test_the_resync_polls_only_contributions_no_watch_will_move() -> None:
    from medforge_operator.reconcile_contribution import needs_polling

    def obj(reason: str | None, phase: str = "Pending", observed: int = 1) -> dict[str, Any]:
        status: dict[str, Any] = {"observedGeneration": observed, "phase": phase}
        if reason:
            status["conditions"] = [{"type": "Ready", "status": "False", "reason": reason}]
        return {"metadata": {"generation": 1}, "status": status}

    # Waiting on the world: the store, an upload, a verification, or nothing written yet.
    for reason in (
        "StoreUnreachable",
        "BaseModelNotReady",
        "NamespaceNotManaged",
        "Verifying",
        None,
    ):
        assert needs_polling(obj(reason)), reason
    assert needs_polling(obj("JobCreated", observed=0))  # a new spec nobody handled yet
    assert needs_polling({"metadata": {"generation": 1}})
    # Moved by its Job's and pods' events, or finished.
    for reason in ("JobCreated", "Training", "CreateContainerConfigError"):
        assert not needs_polling(obj(reason)), reason
    done = obj("Verified", phase="Succeeded")
    done["metadata"] |= {"namespace": "h", "name": "c", "uid": "u"}
    done["status"]["artifact"] = {
        "digest": "sha256:" + "a" * 64,
        "uri": f"s3://forge/verified/contributions/h/c/u/{'a' * 64}/",
    }
    assert not needs_polling(done)
    assert not needs_polling(obj("BackoffLimitExceeded", phase="Failed"))
    # Verified before the operator kept its own copies: polled until its copy is made.
    done["status"]["artifact"]["uri"] = "s3://forge/contributions/h/c/u/1/"
    assert needs_polling(done)


def test_long_names_become_valid_label_values() -> None:
    long = "radiology-" + "x" * 100 + ".breakhis"
    value = names.label_value(long)
    assert len(value) <= 63 and value[-1].isalnum() and value[0].isalnum()
    assert value == names.label_value(long) and value != names.label_value(long + "2")
    assert names.label_value("short") == "short"
    obj = lorac()
    obj["metadata"]["name"] = long
    job = contribution.training_job(obj, SETTINGS, BASE)
    labels = job["metadata"]["labels"]
    assert all(len(v) <= 63 for v in labels.values()), labels
    # The full name travels in an annotation, which is how the operator finds the owner.
    assert jobs.owner_of(job) == long
    assert jobs.owner_of({"metadata": job["spec"]["template"]["metadata"]}) == long


def test_dense_and_subspace_strategies_always_merge_every_input_afresh() -> None:
    afresh = strategy.names(incremental=False)
    assert {"ties", "dare-linear", "dare-ties", "iso-c", "tsv", "core-ties"} <= set(afresh)
    for kind in afresh:
        spec = {"strategy": {"type": kind}, "integration": "incremental"}
        assert composite.effective_integration(spec) == "full", kind
    assert composite.effective_integration({"strategy": {"type": "fusion"}}) == "incremental"
