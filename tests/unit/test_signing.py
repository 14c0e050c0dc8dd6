"""The one signing policy (medforge_operator.signing) and what the operator reads from tenant
namespaces as untrusted input: grants built from the custom resource alone, every plan key
checked against them, results and manifests parsed as hostile, names valid for every valid
object name, configs bounded by a Secret's size."""

from __future__ import annotations

import json
import re
from typing import Any, cast

import pytest

from medforge_common.artifacts import COMPOSITE_FILES, CONTRIBUTION_FILES
from medforge_common.uris import S3Uri
from medforge_operator import (
    basemodel,
    composite,
    contribution,
    jobs,
    names,
    signing,
    verify_contribution,
)
from medforge_operator.observed import slim
from tests import builders

DIGEST = "sha256:" + "a" * 64
BASE = basemodel.Resolved(
    "clip", DIGEST, S3Uri("forge", "base-models/clip/"), ("manifest.json", "model.safetensors")
)


def lorac(name: str = "lung", ns: str = "hospital-a", uid: str = "ua", gen: int = 3) -> Any:
    return builders.lorac(
        name,
        ns,
        uid,
        gen,
        task="lung",
        dataset="s3://hospital-data/lung/",
        sharing={"forges": ["forge/f"]},
    )


def urls(kind: str) -> Any:
    return lambda uri: f"https://s3/{uri.bucket}/{uri.key}?X-Amz-Signature={kind}"


def signed_keys(plan: Any, grant: signing.Grant) -> set[tuple[str, str]]:
    cfg = signing.sign(plan, grant, urls("get"), urls("put"))
    found = re.findall(r"https://s3/forge/([^?\"]+)\?X-Amz-Signature=(get|put)", json.dumps(cfg))
    return {(m, k) for k, m in found}


def test_a_training_job_is_signed_its_own_outputs_and_the_base_model_only() -> None:
    obj = lorac()
    plan = contribution.train_plan(obj, BASE, contribution.output_prefix("forge", obj, 3))
    grant = contribution.training_grant("forge", obj, BASE)
    assert signed_keys(plan, grant) == {
        ("get", "base-models/clip/manifest.json"),
        ("get", "base-models/clip/model.safetensors"),
        *{("put", f"contributions/hospital-a/lung/ua/3/{f}") for f in CONTRIBUTION_FILES},
    }


@pytest.mark.parametrize(
    ("method", "target"),
    [
        # another hospital's adapter and distilled set
        ("get", "s3://forge/contributions/hospital-b/lung/ub/1/adapter.safetensors"),
        ("get", "s3://forge/verified/contributions/hospital-b/lung/ub/" + "b" * 64 + "/x"),
        # overwriting the base model every hospital trains on
        ("put", "s3://forge/base-models/clip/model.safetensors"),
        # its own older generation, another uid under the same name, the verified copies
        ("put", "s3://forge/contributions/hospital-a/lung/ua/2/adapter.safetensors"),
        ("put", "s3://forge/contributions/hospital-a/lung/old-uid/3/adapter.safetensors"),
        ("put", "s3://forge/verified/contributions/hospital-a/lung/ua/x/adapter.safetensors"),
        # a composite, a listing, another bucket, a traversal, something that is no S3 URI
        ("get", "s3://forge/composites/forge/f/cu/rev-1/adapter.safetensors"),
        ("get", "s3://forge/"),
        ("get", "s3://other-bucket/base-models/clip/model.safetensors"),
        ("get", "s3://forge/base-models/clip/../../contributions/hospital-b/x"),
        ("get", "pvc://claim/x"),
        ("put", "https://evil.example/x"),
    ],
)
def test_anything_outside_the_grant_is_refused_and_nothing_signed(method: str, target: str) -> None:
    obj = lorac()
    plan = contribution.train_plan(obj, BASE, contribution.output_prefix("forge", obj, 3))
    if method == "get":
        plan["baseModel"]["files"].append({"name": "x", "get": target})
    else:
        plan["output"]["files"]["x"] = {"put": target}
    signed: list[str] = []
    with pytest.raises(signing.SigningRefused):
        signing.sign(
            plan,
            contribution.training_grant("forge", obj, BASE),
            lambda u: signed.append(str(u)) or "",  # type: ignore[func-returns-value]
            lambda u: signed.append(str(u)) or "",  # type: ignore[func-returns-value]
        )
    assert signed == []  # checked whole before a single URL is made


def test_the_grant_never_depends_on_anything_a_tenant_writes() -> None:
    """Only metadata the API server sets (uid, generation) and the spec feed a grant: a
    tenant's labels, annotations or status-looking fields change nothing."""
    obj = lorac()
    grant = contribution.training_grant("forge", obj, BASE)
    noisy = json.loads(json.dumps(obj))
    noisy["metadata"]["labels"] = {"medforge.io/owner": "hospital-b"}
    noisy["metadata"]["annotations"] = {"medforge.io/job-plan": '{"put": "s3://forge/x"}'}
    assert contribution.training_grant("forge", noisy, BASE) == grant


def merge_fixture() -> tuple[Any, Any, Any]:
    comp = {
        "metadata": {"name": "f", "namespace": "forge", "uid": "cu"},
        "spec": {"integration": "incremental"},
        "status": {
            "current": {
                "revision": 2,
                "uri": "s3://forge/verified/composites/forge/f/cu/rev-2/",
                "digest": DIGEST,
                "files": ["manifest.json", "adapter.safetensors"],
            }
        },
    }
    a, b = lorac("a", "hospital-a", "ua", 1), lorac("b", "hospital-b", "ub", 1)
    for c, d in ((a, "1"), (b, "2")):
        c["status"] = {
            "artifact": {
                "digest": "sha256:" + d * 64,
                "uri": f"s3://forge/verified/contributions/{c['metadata']['namespace']}/"
                f"{c['metadata']['name']}/{c['metadata']['uid']}/{d * 64}/",
                "files": ["manifest.json", "adapter.safetensors", "distilled.safetensors"],
            }
        }
    return comp, a, b


def test_a_merge_job_reads_verified_inputs_and_its_own_revision_and_writes_the_next() -> None:
    comp, a, b = merge_fixture()
    plan = composite.Plan(3, [a, b], [a, b])
    job_plan = composite.merge_plan(
        comp, plan, BASE, composite.output_prefix("forge", comp, 3), "forge"
    )
    keys = signed_keys(job_plan, composite.merge_grant("forge", comp, plan, BASE))
    puts = {k for m, k in keys if m == "put"}
    gets = {k for m, k in keys if m == "get"}
    assert puts == {f"composites/forge/f/cu/rev-3/{f}" for f in COMPOSITE_FILES}
    assert all(
        k.startswith(
            (
                "base-models/clip/",
                "verified/contributions/hospital-a/a/ua/",
                "verified/contributions/hospital-b/b/ub/",
                "verified/composites/forge/f/cu/rev-2/",
            )
        )
        for k in gets
    )
    # A contribution that no longer consents is not in the grant: its files are refused.
    only_a = composite.merge_grant("forge", comp, composite.Plan(3, [a], [a]), BASE)
    with pytest.raises(signing.SigningRefused, match="hospital-b"):
        signing.sign(job_plan, only_a, urls("get"), urls("put"))


def test_a_pending_revision_is_found_again_among_consenting_ready_inputs() -> None:
    _, a, b = merge_fixture()
    for c in (a, b):
        c["status"] |= {
            "observedGeneration": 1,
            "conditions": [{"type": "Ready", "status": "True"}],
        }
        c["status"]["artifact"]["baseModelDigest"] = DIGEST
    pending = {
        "revision": 3,
        "digests": [b["status"]["artifact"]["digest"]],
        "inputs": [a["status"]["artifact"]["digest"], b["status"]["artifact"]["digest"]],
    }
    new, every = composite.merge_inputs(pending, [b, a], DIGEST)
    assert new == [b] and every == [a, b]
    # Withdrawn (not listed any more), or retrained for another base: not read.
    assert composite.merge_inputs(pending, [a], DIGEST) == ([], [a])
    assert composite.merge_inputs(pending, [a, b], "sha256:" + "c" * 64) == ([], [])


@pytest.mark.parametrize(
    ("result", "field"),
    [
        ({"artifact": "x"}, "artifact"),
        ([1, 2], "JSON object"),
        ({"artifact": {}}, "artifact.digest"),
        ({"artifact": {"digest": "sha256:zz"}}, "artifact.digest"),
        ({"artifact": {"digest": ["sha256:" + "a" * 64]}}, "artifact.digest"),
    ],
)
def test_a_forged_result_is_a_verdict_naming_the_field(result: Any, field: str) -> None:
    with pytest.raises(contribution.InvalidResult, match=field):
        contribution.announced_digest(result)
    assert contribution.announced_digest({"artifact": {"digest": DIGEST}}) == DIGEST


def test_figures_from_a_manifest_are_bounded_and_typed() -> None:
    figures = contribution.training_figures(
        {"epochs": 3.5, "batchSize": 32.0, "loss": float("nan"), "seconds": 2, "x": 1}
    )
    assert figures == {"batchSize": 32, "seconds": 2}  # epochs 3.5 would fail the status patch
    assert isinstance(figures["batchSize"], int)
    metrics = contribution.validation_metrics(
        {"accuracy": 0.9, "auc": "high", "evil_label_" + "x" * 200: 1.0, "samples": 10}
    )
    assert metrics == {"accuracy": 0.9, "samples": 10}
    spec = lorac()["spec"]
    assert contribution.manifest_matches_spec({"task": "lung", "classes": ["a", "b"]}, spec) is None
    assert "meta.task" in str(
        contribution.manifest_matches_spec({"task": "brain", "classes": ["a", "b"]}, spec)
    )
    assert "meta.classes" in str(
        contribution.manifest_matches_spec({"task": "lung", "classes": ["b", "a"]}, spec)
    )


@pytest.mark.parametrize(
    "name",
    [
        "a" * 253,
        "a" * 43 + "." + "b" * 100,  # a dot at the training Job name's cut
        "a" * 41 + "." + "b" * 100,  # ... and at the merge Job name's
        "a" * 38 + "-b." + "c" * 100,
        "x." * 120 + "y",
        "a" * 40 + "." + "b",
    ],
)
def test_child_names_are_valid_for_every_valid_object_name(name: str) -> None:
    dns1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    for child in (names.training_job_name(name, 12), names.merge_job_name(name, 1234)):
        assert len(child) <= names.MAX and dns1123.match(child), child
        assert dns1123.match(jobs.config_secret_name(child))
    label = names.label_value(name)
    assert len(label) <= 63 and re.match(r"^[a-z0-9A-Z]([-_.a-z0-9A-Z]*[a-z0-9A-Z])?$", label)


def test_a_config_too_large_for_a_secret_is_measured_before_it_is_written() -> None:
    many = basemodel.Resolved(
        "big",
        DIGEST,
        S3Uri("forge", "base-models/big/"),
        tuple(f"shard-{i:05d}.safetensors" for i in range(5000)),
    )
    obj = lorac()
    plan = contribution.train_plan(obj, many, contribution.output_prefix("forge", obj, 3))
    cfg = signing.sign(
        plan, contribution.training_grant("forge", obj, many), urls("get" * 100), urls("put")
    )
    job = {"metadata": {"name": "j", "namespace": "h", "uid": "u"}}
    assert jobs.secret_size(jobs.config_secret(job, cfg, "t")) > jobs.MAX_CONFIG_BYTES
    # The Job itself carries no plan: its annotations stay small whatever the model.
    built = contribution.training_job(obj, _settings(), many)
    assert len(json.dumps(built["metadata"]["annotations"])) < 1024


def _settings() -> Any:
    from medforge_operator.settings import Settings

    return Settings("http://s3", "forge", "ak", "sk", forge_namespaces=("forge",))


def test_the_operator_keeps_only_what_metrics_need_of_each_contribution() -> None:
    body = lorac()
    body["spec"]["padding"] = "x" * 4096
    body["metadata"]["annotations"] = {"big": "y" * 4096}
    body["status"] = {"phase": "Succeeded", "artifact": {"files": ["z" * 4096]}}
    kept = slim(body, "loracontributions")
    assert kept["spec"] == {"task": {"name": "lung"}}
    assert kept["status"] == {"phase": "Succeeded"}
    assert len(json.dumps(kept)) < 400


def test_every_log_line_is_redacted_whoever_logs_it() -> None:
    import io
    import logging

    from medforge_common.redact import RedactingFilter

    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.addFilter(RedactingFilter())
    log = logging.getLogger("urllib3.test")
    log.addHandler(handler)
    try:
        log.warning("retrying %s", "url: /forge/a?X-Amz-Signature=abc&X-Amz-Credential=AK")
        try:
            raise OSError("Max retries exceeded with url: /forge/a?X-Amz-Signature=abc")
        except OSError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    out = buf.getvalue()
    assert "retrying url: /forge/a?<redacted>" in out and "failed" in out
    assert "abc" not in out and "AK" not in out


def test_a_result_that_is_no_result_never_reaches_the_store() -> None:

    class NoStore:
        bucket = "forge"

        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"the store was used: {name}")

    for message, field in (
        ('{"artifact": "x"}', "artifact"),
        ('{"artifact": {"digest": "../../x"}}', "artifact.digest"),
    ):
        pod = {
            "metadata": {"name": "p", "creationTimestamp": "t"},
            "status": {
                "containerStatuses": [
                    {"state": {"terminated": {"exitCode": 0, "message": message}}}
                ]
            },
        }
        done = {"status": {"conditions": [{"type": "Complete", "status": "True"}]}}
        o = contribution.Observation(3, "lung-train-g3", job=done, pods=[pod])
        verify_contribution.verify(lorac(), o, NoStore(), lambda ns: [])  # type: ignore[arg-type]
        assert o.verify_error is not None and o.verify_error[0] == "InvalidResult"
        assert field in o.verify_error[1]
        status = contribution.compute_status({}, o)
        stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
        assert status["phase"] == "Failed" and stalled["reason"] == "InvalidResult"


def test_a_contribution_verified_before_copies_were_kept_gets_its_copy_once() -> None:
    from medforge_common.manifest import FileEntry, Manifest
    from medforge_operator import reconcile_contribution

    obj = lorac()
    digest = "sha256:" + "d" * 64
    obj["status"] = {
        "observedGeneration": 3,
        "phase": "Succeeded",
        "artifact": {"digest": digest, "uri": "s3://forge/contributions/hospital-a/lung/ua/3/"},
    }
    assert not reconcile_contribution.settled(obj) and reconcile_contribution.needs_polling(obj)

    class Store:
        bucket = "forge"
        copied: list[tuple[str, str]] = []

        def verify_copy(self, upload: S3Uri, verified: S3Uri, d: str) -> Manifest:
            self.copied.append((str(upload), str(verified)))
            return Manifest("contribution", DIGEST, [FileEntry("adapter.safetensors", "0" * 64, 1)])

    class Kube:
        patches: list[Any] = []

        def patch_status(self, *args: Any) -> None:
            self.patches.append(args)

    store, kube = Store(), Kube()
    new = reconcile_contribution.reconcile(
        obj, cast(Any, kube), cast(Any, store), cast(Any, None), lambda *_: None, cast(Any, None)
    )
    assert store.copied == [
        (
            "s3://forge/contributions/hospital-a/lung/ua/3/",
            f"s3://forge/verified/contributions/hospital-a/lung/ua/{'d' * 64}/",
        )
    ]
    assert new["artifact"]["uri"] == store.copied[0][1] and len(kube.patches) == 1
    obj["status"] = new
    assert reconcile_contribution.settled(obj)
    assert not reconcile_contribution.needs_polling(obj)


@pytest.mark.parametrize(
    "dataset",
    [
        {"uri": "s3://hospital-data/lung/", "credentialsSecretRef": {"name": "lung-keys"}},
        {"uri": "pvc://scans/lung/v2"},
        {"uri": "s3://hospital-data/lung/"},
    ],
)
def test_a_training_pod_reaches_only_what_its_spec_names(dataset: dict[str, Any]) -> None:
    """What the admission policy cannot see (it has no view of the custom resource): the
    config Secret is the Job's own, every secretKeyRef is the dataset Secret the spec names,
    the only PVC is the one pvc:// names, read-only; nothing else is mounted or referenced."""
    obj = lorac()
    obj["spec"]["dataset"] = dataset
    job = contribution.training_job(obj, _settings(), BASE)
    pod = job["spec"]["template"]["spec"]
    name = job["metadata"]["name"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes.pop("scratch") == {"name": "scratch", "emptyDir": {}}
    assert volumes.pop("job-config")["secret"]["secretName"] == f"{name}-config"
    if dataset["uri"].startswith("pvc://"):
        assert volumes.pop("dataset") == {
            "name": "dataset",
            "persistentVolumeClaim": {"claimName": "scans", "readOnly": True},
        }
    assert volumes == {}
    refs = [
        e["valueFrom"]["secretKeyRef"]["name"]
        for c in pod["containers"]
        for e in c.get("env") or []
        if "valueFrom" in e
    ]
    ref = dataset.get("credentialsSecretRef")
    assert refs == ([ref["name"]] * 2 if ref else [])
    assert not any("envFrom" in c for c in pod["containers"])
    assert pod.get("serviceAccountName") is None and pod["automountServiceAccountToken"] is False
    for c in pod["containers"]:
        assert c["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert all(m["name"] in ("scratch", "job-config", "dataset") for m in c["volumeMounts"])


def test_a_manifest_may_list_the_contracts_files_only() -> None:
    spec = lorac()["spec"]
    meta = {"task": "lung", "classes": ["a", "b"]}
    ok = ["manifest.json", "adapter.safetensors", "distilled.safetensors"]
    assert contribution.manifest_matches_spec(meta, spec, ok) is None
    why = contribution.manifest_matches_spec(meta, spec, [*ok, "x" * 5000])
    assert why is not None and why.startswith("files:") and len(why) < 200
