"""Tenancy in the operator's pure logic: Jobs carry no URL, configs are signed from plans that
name only the forge store, base models resolve by name, consent and selectors, reason codes."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from medforge_common import redact
from medforge_common.uris import S3Uri
from medforge_operator import basemodel, composite, contribution, jobs, jobstatus, signing
from medforge_operator.settings import Settings, SettingsError, load
from tests.builders import lorac

SETTINGS = Settings("http://s3", "forge", "ak", "sk", forge_namespaces=("forge",))
DIGEST = "sha256:" + "a" * 64
BASE = basemodel.Resolved(
    "clip", DIGEST, S3Uri("forge", "base-models/clip/"), ("manifest.json", "config.json")
)


def fake_sign(kind: str) -> Any:
    return lambda uri: f"https://store/{uri.bucket}/{uri.key}?X-Amz-Signature={kind}"


def test_the_job_holds_no_url_and_mounts_its_config_from_a_secret() -> None:
    obj = lorac()
    out = contribution.output_prefix("forge", obj, 1)
    plan = contribution.train_plan(obj, BASE, out)
    job = contribution.training_job(obj, SETTINGS, BASE)
    text = json.dumps(job)
    assert "X-Amz" not in text and "https://" not in text
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert {e["name"] for e in c["env"]} >= {"MEDFORGE_JOB_CONFIG_FILE"}
    assert "MEDFORGE_JOB_CONFIG" not in {e["name"] for e in c["env"]}
    vol = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "job-config")
    assert vol["secret"]["secretName"] == "breakhis-train-g1-config"
    # The plan names only the forge bucket: the base model's prefix and the own output prefix.
    refs = [f["get"] for f in plan["baseModel"]["files"]] + [
        f["put"] for f in plan["output"]["files"].values()
    ]
    assert all(
        r.startswith(("s3://forge/base-models/clip/", "s3://forge/contributions/hospital-a/"))
        for r in refs
    )
    # Annotations are for people: nothing the operator signs is kept on the Job.
    assert "plan" not in json.dumps(job["metadata"]["annotations"])
    assert not any("lifetime" in k for k in job["metadata"]["annotations"])


def test_signing_turns_refs_into_urls_and_the_secret_is_owned_by_the_job() -> None:
    obj = lorac()
    plan = contribution.train_plan(obj, BASE, contribution.output_prefix("forge", obj, 1))
    grant = contribution.training_grant("forge", obj, BASE)
    cfg = signing.sign(plan, grant, fake_sign("get"), fake_sign("put"))
    assert cfg["baseModel"]["files"][1] == {
        "name": "config.json",
        "url": "https://store/forge/base-models/clip/config.json?X-Amz-Signature=get",
    }
    assert cfg["output"]["files"]["adapter.safetensors"].endswith("=put")
    assert cfg["task"] == obj["spec"]["task"]
    job = {"metadata": {"name": "j", "namespace": "h", "uid": "u", "labels": {"evil": "b"}}}
    secret = jobs.config_secret(job, cfg, "2026-01-01T00:00:00Z")
    assert secret["metadata"]["ownerReferences"][0] | {} == {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "name": "j",
        "uid": "u",
        "controller": True,
        "blockOwnerDeletion": False,
    }
    assert "evil" not in secret["metadata"]["labels"]  # never copied from the Job
    assert json.loads(secret["stringData"][jobs.CONFIG_KEY]) == cfg


def test_url_lifetime_follows_the_jobs_deadline() -> None:
    assert contribution.url_lifetime({"activeDeadlineSeconds": 3600}, SETTINGS) == 4200
    assert contribution.url_lifetime({"activeDeadlineSeconds": 10**7}, SETTINGS) == 7 * 24 * 3600
    assert contribution.url_lifetime({}, SETTINGS) == SETTINGS.presign_expiry_seconds
    # What is read from the Job (its deadline, from its start) can only shorten it.
    now = 1_700_000_000.0
    started = dt.datetime.fromtimestamp(now - 3000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    job = {"spec": {"activeDeadlineSeconds": 3600}, "status": {"startTime": started}}
    assert jobs.capped_lifetime(job, 7200, now) == 3600 - 3000 + jobs.URL_SLACK
    assert jobs.capped_lifetime({"spec": {"activeDeadlineSeconds": 10**9}}, 7200, now) == 7200
    assert jobs.capped_lifetime({"spec": {}}, 10**9, now) == jobs.MAX_URL_LIFETIME
    assert jobs.capped_lifetime({"spec": {"activeDeadlineSeconds": "1e9"}}, 7200, now) == 7200
    expired = {"spec": {"activeDeadlineSeconds": 60}, "status": {"startTime": started}}
    assert jobs.capped_lifetime(expired, 7200, now) == 60  # never below a minute


@pytest.mark.parametrize(
    "msg",
    [
        "HTTP 403 for https://s3.example/forge/a?X-Amz-Credential=AK%2F&X-Amz-Signature=abc end",
        # urllib3's MaxRetryError: a bare path, no scheme
        "Max retries exceeded with url: /forge/a?X-Amz-Algorithm=AWS4&X-Amz-Signature=abc end",
        "(url=/forge/a?X-Amz-Date=1&X-Amz-Signature=abc&X-Amz-Credential=AK) end",
        # cut, or the parameters alone
        "X-Amz-Signature=abc&X-Amz-Credential=AK%2F end",
        "GET http://s3/forge/a?AWSAccessKeyId=AK&Signature=abc&Expires=1 end",
        "https://s3/forge/a?x-amz-signature=abc end",
    ],
)
def test_presigned_urls_are_redacted_from_copied_messages(msg: str) -> None:
    out = jobs.redact_urls(msg)
    assert "abc" not in out and "AK" not in out and out.endswith(" end"), out
    assert redact.redact_all({"m": [msg]}) == {"m": [out]}
    pods = [
        {
            "metadata": {"name": "p", "creationTimestamp": "t", "labels": {"job-name": "j"}},
            "status": {
                "phase": "Failed",
                "containerStatuses": [{"state": {"terminated": {"exitCode": 1, "message": msg}}}],
            },
        }
    ]
    assert "X-Amz" not in str(jobstatus.pod_summary(pods)["failure_message"])


def test_own_config_secret_arriving_late_is_not_a_user_error() -> None:
    def waiting(message: str) -> list[dict[str, Any]]:
        state = {"waiting": {"reason": "CreateContainerConfigError", "message": message}}
        return [
            {
                "metadata": {"name": "p", "creationTimestamp": "t", "labels": {"job-name": "j"}},
                "status": {"phase": "Pending", "containerStatuses": [{"state": state}]},
            }
        ]

    assert jobstatus.pod_summary(waiting('secret "j-config" not found'))["config_error"] is None
    assert jobstatus.pod_summary(waiting('secret "creds" not found'))["config_error"]


def test_base_models_resolve_by_name_with_reasons() -> None:
    obj: dict[str, Any] = {"metadata": {"name": "clip", "generation": 2}, "spec": {}}
    with pytest.raises(basemodel.BaseModelUnusable) as exc:
        basemodel.resolve(None, "clip", None, "spec.baseModel")
    assert exc.value.reason == "BaseModelNotFound" and "spec.baseModel.name" in exc.value.message
    obj["status"] = {"phase": "Ready", "observedGeneration": 1}  # verified an older spec
    with pytest.raises(basemodel.BaseModelUnusable, match="not verified"):
        basemodel.resolve(obj, "clip", None, "spec.baseModel")
    obj["status"] = {
        "phase": "Ready",
        "observedGeneration": 2,
        "digest": DIGEST,
        "uri": "s3://forge/base-models/clip/",
        "files": ["config.json"],
    }
    got = basemodel.resolve(obj, "clip", None, "spec.baseModel")
    assert got.digest == DIGEST and got.uri == S3Uri("forge", "base-models/clip/")
    assert [f["name"] for f in got.file_refs()] == ["manifest.json", "config.json"]
    with pytest.raises(basemodel.BaseModelUnusable) as exc:
        basemodel.resolve(obj, "clip", "sha256:" + "b" * 64, "spec.baseModel")
    assert exc.value.reason == "BaseModelDigestMismatch"
    # The prefix is always under base-models/ of the forge bucket.
    assert basemodel.store_prefix(
        "forge", {"metadata": {"name": "m"}, "spec": {"path": "a/b"}}
    ) == (S3Uri("forge", "base-models/a/b/"))


def test_base_model_training_defaults_and_allowed_queues() -> None:
    training = {"gpus": 1, "nodeSelector": {"gpu": "h100"}, "allowedQueues": ["gpu", "cpu"]}
    out = basemodel.training_resources({}, training, "spec.resources")
    assert out == {"gpus": 1, "nodeSelector": {"gpu": "h100"}, "queueName": "gpu"}
    out = basemodel.training_resources({"gpus": 4, "queueName": "cpu"}, training, "r")
    assert out["gpus"] == 4 and out["queueName"] == "cpu"
    with pytest.raises(ValueError, match=r"spec\.resources\.queueName 'vip' is not allowed"):
        basemodel.training_resources({"queueName": "vip"}, training, "spec.resources")


def test_base_model_status_from_an_observation() -> None:
    o = basemodel.Observation(1, "s3://forge/base-models/m/")
    st = basemodel.compute_status({}, o)
    assert st["phase"] == "Pending" and st["conditions"][0]["reason"] == "NotUploaded"
    o.invalid = "config.json: sha256 differs"
    st = basemodel.compute_status(st, o)
    assert st["phase"] == "Failed" and st["conditions"][2]["status"] == "True"
    o = basemodel.Observation(
        1, "s3://x", verified={"digest": DIGEST, "sizeBytes": 3, "files": ["config.json"]}
    )
    st = basemodel.compute_status(st, o)
    assert st["phase"] == "Ready" and st["digest"] == DIGEST
    assert basemodel.settled({"metadata": {"generation": 1}, "status": st})


def test_consent_and_label_selectors() -> None:
    c = lorac(sharing={"forges": ["forge/model"]})
    assert composite.shares_with(c, "forge/model")
    assert not composite.shares_with(c, "forge/other") and not composite.shares_with(
        lorac(), "forge/model"
    )
    sel = {
        "matchLabels": {"a": "1"},
        "matchExpressions": [
            {"key": "tier", "operator": "In", "values": ["x"]},
            {"key": "gone", "operator": "DoesNotExist"},
        ],
    }
    assert composite.selector_matches(sel, {"a": "1", "tier": "x"})
    assert not composite.selector_matches(sel, {"a": "1", "tier": "y"})
    assert not composite.selector_matches(sel, {"a": "1", "tier": "x", "gone": ""})
    assert composite.selector_matches(
        {"matchExpressions": [{"key": "k", "operator": "NotIn", "values": ["v"]}]}, {}
    )


def test_composite_inputs_carry_reason_codes_only() -> None:
    def contrib(name: str, phase: str, ready: bool, base: str = DIGEST) -> dict[str, Any]:
        return {
            "metadata": {"namespace": "h", "name": name, "generation": 1, "uid": name},
            "status": {
                "observedGeneration": 1,
                "phase": phase,
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True" if ready else "False",
                        "reason": "BackoffLimitExceeded",
                        "message": "s3://hospital-secret-bucket/data/ holds no class folders",
                        "lastTransitionTime": "t",
                    }
                ],
                "artifact": {
                    "digest": f"sha256:{name}",
                    "baseModelDigest": base,
                    "uri": f"s3://forge/verified/contributions/h/{name}/{name}/{name}/",
                },
            },
        }

    comp: dict[str, Any] = {
        "metadata": {"name": "f", "namespace": "forge", "uid": "cu"},
        "spec": {},
        "status": {"excluded": {"sha256:old": "ExcludedByMerger: rank is a string"}},
    }
    failed = contrib("failed", "Failed", False)
    other = contrib("other", "Succeeded", True, base="sha256:" + "b" * 64)
    old = contrib("old", "Succeeded", True)
    fresh = contrib("fresh", "Succeeded", True)
    inputs, candidates = composite.evaluate_inputs(comp, [failed, other, old, fresh], DIGEST)
    reasons = {i["name"]: i["reason"] for i in inputs}
    assert reasons == {
        "failed": "TrainingFailed",
        "other": "BaseModelMismatch",
        "old": "ExcludedByMerger",
        "fresh": "Queued",
    }
    assert "hospital-secret-bucket" not in json.dumps(inputs)
    assert [c["metadata"]["name"] for c in candidates] == ["fresh"]
    # An artifact not (yet) in the operator's verified copy is no candidate.
    unverified = json.loads(json.dumps(fresh))
    unverified["status"]["artifact"]["uri"] = "s3://forge/contributions/h/fresh/fresh/1/"
    inputs, candidates = composite.evaluate_inputs(comp, [unverified], DIGEST)
    assert candidates == [] and inputs[0]["reason"] == "NotReady"
    # Without a usable base model nothing is a candidate.
    inputs, candidates = composite.evaluate_inputs(comp, [fresh], None)
    assert candidates == [] and inputs[0]["reason"] == "BaseModelNotReady"


def test_merge_plan_reads_inputs_only_from_their_verified_copies() -> None:
    comp: dict[str, Any] = {
        "metadata": {"name": "f", "namespace": "forge", "uid": "cu"},
        "spec": {},
    }
    digest = "sha256:" + "1" * 64
    good = {
        "metadata": {"namespace": "h", "name": "a", "uid": "ua"},
        "status": {
            "artifact": {
                "digest": digest,
                "uri": f"s3://forge/verified/contributions/h/a/ua/{'1' * 64}/",
                "files": ["adapter.safetensors", "manifest.json"],
            }
        },
    }
    uri = composite.output_prefix("forge", comp, 1)
    plan = composite.merge_plan(comp, composite.Plan(1, [good], [good]), BASE, uri, "forge")
    assert [f["get"] for f in plan["inputs"][0]["files"]] == [
        f"s3://forge/verified/contributions/h/a/ua/{'1' * 64}/manifest.json",
        f"s3://forge/verified/contributions/h/a/ua/{'1' * 64}/adapter.safetensors",
    ]
    grant = composite.merge_grant("forge", comp, composite.Plan(1, [good], [good]), BASE)
    assert signing.sign(plan, grant, fake_sign("get"), fake_sign("put"))
    for forged_uri in (
        "s3://forge/contributions/other/b/1/",  # another hospital's upload
        "s3://forge/contributions/h/a/ua/1/",  # its own upload, not the verified copy
        f"s3://forge/verified/contributions/h/b/ub/{'1' * 64}/",
    ):
        forged = json.loads(json.dumps(good))
        forged["status"]["artifact"]["uri"] = forged_uri
        with pytest.raises(ValueError, match="not its verified copy"):
            composite.merge_plan(comp, composite.Plan(1, [forged], [forged]), BASE, uri, "forge")


def test_tenancy_settings() -> None:
    env = {
        "MEDFORGE_STORE_ENDPOINT": "http://s3",
        "MEDFORGE_STORE_BUCKET": "forge",
        "AWS_ACCESS_KEY_ID": "a",
        "AWS_SECRET_ACCESS_KEY": "b",
    }
    s = load([], env | {"MEDFORGE_FORGE_NAMESPACES": "forge, lab"})
    assert s.forge_namespaces == ("forge", "lab") and s.member_selector == (
        "medforge.io/member",
        "true",
    )
    assert load([], env).forge_namespaces == ()  # secure default: no forge at all
    with pytest.raises(SettingsError, match="MEDFORGE_MEMBER_LABEL"):
        load([], env | {"MEDFORGE_MEMBER_LABEL": "nolabel"})
    with pytest.raises(SettingsError, match="MEDFORGE_FORGE_NAMESPACES: lab not among"):
        load([], env | {"MEDFORGE_NAMESPACES": "forge", "MEDFORGE_FORGE_NAMESPACES": "forge,lab"})
