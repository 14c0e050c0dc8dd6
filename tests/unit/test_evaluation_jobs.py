"""An evaluation Job in a hospital's namespace (medforge_operator.evaluation): signed the
candidate's and the served revision's model files, the base model, its own head and its own
training fingerprints, and nothing else (never a revision's tasks file, which holds every
task's head and distilled set, nor another hospital's contribution); PUT its one result; a
restricted pod with the hospital's own credentials; consent as for contributions."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from medforge_common.uris import S3Uri
from medforge_operator import basemodel, evaluation, signing
from medforge_operator.settings import Settings
from tests import builders

pytestmark = pytest.mark.unit
DIGEST = "sha256:" + "a" * 64
BASE = basemodel.Resolved(
    "clip", DIGEST, S3Uri("forge", "base-models/clip/"), ("manifest.json", "model.safetensors")
)
FILES = ["adapter.safetensors", "tasks.safetensors", "result.json"]


def evs(ns: str = "hospital-a", head: str = "linear", forges: Any = ("forge/f",)) -> Any:
    return {
        "apiVersion": "medforge.io/v1alpha1",
        "kind": "EvaluationSet",
        "metadata": {"name": "held-out", "namespace": ns, "uid": f"evs-{ns}", "generation": 1},
        "spec": {
            "task": {"name": "lung", "classes": ["a", "b"], "head": head},
            "dataset": {"uri": "s3://hospital-data/held/", "credentialsSecretRef": {"name": "d"}},
            "forges": list(forges),
        },
    }


def composite() -> Any:
    return {
        "kind": "CompositeModel",
        "metadata": {"name": "f", "namespace": "forge", "uid": "cu"},
        "spec": {},
        "status": {
            "current": {"revision": 3, "digest": "sha256:" + "c" * 64, "files": FILES},
        },
    }


def ready(ns: str, name: str, head: bool) -> Any:
    c = builders.lorac(name, ns, f"u-{ns}-{name}", 1, task={"name": "lung", "classes": ["a", "b"]})
    files = ["adapter.safetensors", "fingerprints.json", *(["head.safetensors"] if head else [])]
    digest = "sha256:" + "d" * 64
    prefix = signing.verified_contribution("forge", ns, name, f"u-{ns}-{name}", digest)
    c["status"] = {
        "phase": "Succeeded",
        "observedGeneration": 1,
        "conditions": [{"type": "Ready", "status": "True"}],
        "artifact": {
            "digest": digest,
            "uri": str(prefix),
            "files": files,
            "baseModelDigest": DIGEST,
        },
    }
    return c


def signed(plan: Any, grant: signing.Grant) -> set[tuple[str, str]]:
    def url(kind: str) -> Any:
        return lambda uri: f"https://s3/{uri.bucket}/{uri.key}?X-Amz-Signature={kind}"

    cfg = signing.sign(plan, grant, url("get"), url("put"))
    found = re.findall(r"https://s3/forge/([^?\"]+)\?X-Amz-Signature=(get|put)", json.dumps(cfg))
    return {(m, k) for k, m in found}


def test_a_site_gets_the_model_files_its_own_head_and_prints_and_one_put() -> None:
    es, comp = evs(), composite()
    mine = ready("hospital-a", "lung", head=True)
    contribs = [mine, ready("hospital-b", "lung", head=True)]
    own = evaluation.own_contributions(contribs, es, DIGEST)
    assert [c["metadata"]["namespace"] for c in own] == ["hospital-a"]
    cand = {"digest": "sha256:" + "e" * 64, "files": FILES}
    plan = evaluation.plan(es, comp, 4, cand, BASE, own, "forge")
    grant = evaluation.grant(es, comp, 4, FILES, BASE, own, "forge")
    keys = signed(plan, grant)
    rev = "verified/composites/forge/f/cu"
    mine_prefix = "verified/contributions/hospital-a/lung/u-hospital-a-lung/" + "d" * 64
    assert keys == {
        ("get", "base-models/clip/manifest.json"),
        ("get", "base-models/clip/model.safetensors"),
        ("get", f"{rev}/rev-4/manifest.json"),
        ("get", f"{rev}/rev-4/adapter.safetensors"),
        ("get", f"{rev}/rev-3/manifest.json"),
        ("get", f"{rev}/rev-3/adapter.safetensors"),
        ("get", f"{mine_prefix}/manifest.json"),
        ("get", f"{mine_prefix}/head.safetensors"),
        ("get", f"{mine_prefix}/fingerprints.json"),
        (
            "put",
            "evaluations/forge/f/cu/rev-4/hospital-a/held-out/evs-hospital-a/evaluation.json",
        ),
    }
    assert not any("tasks.safetensors" in k or "hospital-b" in k for _, k in keys)
    assert plan["served"]["revision"] == 3 and plan["candidate"]["revision"] == 4


def test_a_plan_that_reaches_another_hospital_or_the_tasks_file_is_refused() -> None:
    es, comp = evs(), composite()
    own = [ready("hospital-a", "lung", head=True)]
    cand = {"digest": "sha256:" + "e" * 64, "files": FILES}
    grant = evaluation.grant(es, comp, 4, FILES, BASE, own, "forge")
    plan = evaluation.plan(es, comp, 4, cand, BASE, own, "forge")
    plan["candidate"]["files"].append({"name": "tasks.safetensors", "get": str(
        S3Uri("forge", "verified/composites/forge/f/cu/rev-4/tasks.safetensors"))})  # fmt: skip
    with pytest.raises(signing.SigningRefused):
        signing.check(plan, grant)
    other = evaluation.plan(
        es, comp, 4, cand, BASE, [ready("hospital-b", "lung", head=True)], "forge"
    )
    with pytest.raises(signing.SigningRefused):
        signing.check(other, grant)


def test_the_job_is_restricted_and_reads_the_sites_own_credentials() -> None:
    job = evaluation.job(evs(), composite(), 4, Settings("http://s3", "forge", "ak", "sk"), BASE)
    assert job["metadata"]["namespace"] == "hospital-a"
    assert job["metadata"]["ownerReferences"][0]["kind"] == "EvaluationSet"
    pod = job["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    (c,) = pod["containers"]
    assert c["command"] == ["medforge-evaluate"]
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"] if "valueFrom" in e}
    assert refs == {"d"}
    # One Job per set, composite and candidate; a valid name whatever the set is called.
    long = evs()
    long["metadata"]["name"] = "x" * 253
    assert len(evaluation.job_name(long, composite(), 12345)) <= 63


def test_consent_and_tasks() -> None:
    comp = composite()
    assert evaluation.consents(evs(), comp)
    assert not evaluation.consents(evs(forges=["forge/other"]), comp)
    assert evaluation.applies(evs(), {"lung", "derm"}) and evaluation.applies(evs(), set())
    assert not evaluation.applies(evs(), {"derm"})
    # A linear head comes from the site's own contribution of the same task and classes only.
    assert evaluation.own_head([ready("hospital-a", "lung", head=False)], evs()) is None
    assert evaluation.own_head([ready("hospital-a", "lung", head=True)], evs()) is not None


def test_a_hospital_counts_once_per_task_however_many_sets_it_declares() -> None:
    sets = []
    for i, stamp in enumerate(
        ["2026-12-03T00:00:02Z", "2026-12-01T00:00:00Z", "2026-12-02T00:00:00Z"]
    ):
        e = evs()
        e["metadata"] |= {"name": f"set-{i}", "creationTimestamp": stamp}
        sets.append(e)
    other = evs("hospital-b")
    kept = evaluation.one_per_task([*sets, other])
    assert [evaluation.site_code(e) for e in kept] == ["hospital-a/set-1", "hospital-b/held-out"]
