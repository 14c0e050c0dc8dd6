"""Hospitals as attackers, with the role they really hold: the built-in `edit` (and `admin`) in
their own namespace, through which everything there is theirs to write (Jobs and their
annotations, pods and termination messages, Secrets). Each attack asserts that the operator
signs no URL outside the allow-list (medforge_operator.signing), that nothing another hospital
or a composite reads changes, and that the operator keeps reconciling everyone else."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from medforge_localcluster.s3 import client
from tests.builders import composite_manifest, contribution
from tests.cluster.conftest import (
    Forge,
    OperatorProcess,
    base_model,
    register_base_model,
)
from tests.cluster.test_operator import condition, status, wait_phase
from tests.cluster.test_tenancy import bind, tenant_roles  # noqa: F401  (a fixture)
from tests.conftest import ClusterAccess
from tests.helpers import get_json, wait_until

pytestmark = pytest.mark.usefixtures("operator")
URL = re.compile(r"https?://[^\s\"']+")


@dataclass(frozen=True)
class Tenants:
    attacker: str  # namespace; ServiceAccounts `mallory` (edit) and `root` (admin)
    victim: str
    tag: str

    def as_(self, sa: str) -> str:
        return f"--as=system:serviceaccount:{self.attacker}:{sa}"


@pytest.fixture
def tenants(cluster: ClusterAccess, tenant_roles: None) -> Iterator[Tenants]:  # noqa: F811
    tag = uuid.uuid4().hex[:6]
    t = Tenants(f"attacker-{tag}", f"victim-{tag}", tag)
    for ns in (t.attacker, t.victim):
        cluster.kubectl("create", "namespace", ns)
        cluster.kubectl("label", "namespace", ns, "medforge.io/member=true", f"tenant={tag}")
    bind(cluster, t.attacker, "mallory", "edit")
    bind(cluster, t.attacker, "root", "admin")
    yield t
    for ns in (t.attacker, t.victim):
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


@pytest.fixture(scope="module")
def base(cluster: ClusterAccess, forge: Forge, operator: OperatorProcess) -> tuple[str, str]:
    return base_model(cluster, forge, "clip-attacks")


def apply_as(cluster: ClusterAccess, t: Tenants, sa: str, doc: str) -> None:
    cluster.kubectl("apply", "-n", t.attacker, "-f", "-", t.as_(sa), input=doc)


def secret_config(cluster: ClusterAccess, ns: str, name: str, *who: str) -> dict[str, Any] | None:
    """A Job's config as `who` reads it (a hospital with `edit` reads its own Secrets)."""
    out = cluster.kubectl("get", "secret", name, "-n", ns, "-o", "json", *who, check=False)
    if out.returncode != 0:
        return None
    data = json.loads(out.stdout).get("data") or {}
    try:
        cfg: dict[str, Any] = json.loads(base64.b64decode(data.get("config.json", "")))
    except ValueError:
        return None
    return cfg


def signed(cfg: dict[str, Any]) -> set[tuple[str, str]]:
    """(key, X-Amz-Expires) of every URL in a config."""
    out = set()
    for url in URL.findall(json.dumps(cfg)):
        parts = urllib.parse.urlsplit(url)
        key = parts.path.split("/", 2)[2]
        expires = urllib.parse.parse_qs(parts.query).get("X-Amz-Expires", [""])[0]
        out.add((key, expires))
    return out


def allowed_for_training(base: tuple[str, str], ns: str, name: str, uid: str) -> tuple[str, ...]:
    return (f"base-models/{base[0]}/", f"contributions/{ns}/{name}/{uid}/")


def every_config_in(cluster: ClusterAccess, ns: str) -> list[dict[str, Any]]:
    """Every Job config Secret in a namespace, as the cluster admin reads them."""
    secrets = get_json(cluster, "secrets", "-n", ns)["items"]
    cfgs = []
    for s in secrets:
        raw = (s.get("data") or {}).get("config.json")
        if raw:
            cfgs.append(json.loads(base64.b64decode(raw)))
    return cfgs


def verified_bytes(forge: Forge, uri: str) -> dict[str, str]:
    """sha256 of every object under a verified prefix."""
    s3 = client(forge.endpoint, forge.access_key, forge.secret_key)
    prefix = uri.split(f"{forge.bucket}/", 1)[1]
    listing = s3.list_objects_v2(Bucket=forge.bucket, Prefix=prefix).get("Contents") or []
    return {
        o["Key"]: hashlib.sha256(
            s3.get_object(Bucket=forge.bucket, Key=o["Key"])["Body"].read()
        ).hexdigest()
        for o in listing
    }


def test_rewriting_the_running_job_and_its_secret_changes_nothing_the_operator_signs(
    cluster: ClusterAccess,
    forge: Forge,
    tenants: Tenants,
    base: tuple[str, str],
    operator: OperatorProcess,
) -> None:
    t = tenants
    cluster.apply(t.victim, contribution("lung", base))
    victim = wait_phase(cluster, t.victim, "lung", "Succeeded")
    before = verified_bytes(forge, victim["artifact"]["uri"])
    apply_as(cluster, t, "mallory", contribution("grab", base, task="slow-25"))

    def training() -> dict[str, Any] | None:
        st = status(cluster, "lorac", t.attacker, "grab")
        return st if condition(st, "Ready").get("reason") == "Training" else None

    st = wait_until(training, 60, what="the attacker's Job training")
    uid = get_json(cluster, "lorac", "grab", "-n", t.attacker)["metadata"]["uid"]
    first = wait_until(
        lambda: secret_config(cluster, t.attacker, "grab-train-g1-config", t.as_("mallory")),
        30,
        what="the config Secret",
    )
    keys = {k for k, _ in signed(first)}
    assert keys and all(
        k.startswith(allowed_for_training(base, t.attacker, "grab", uid)) for k in keys
    ), keys

    # Everything on the Job and its Secret that `edit` may write, rewritten.
    victim_key = victim["artifact"]["uri"].split(f"{forge.bucket}/", 1)[1] + "adapter.safetensors"
    forged_plan = {
        "kind": "train",
        "baseModel": {"files": [{"name": "x", "get": f"s3://{forge.bucket}/{victim_key}"}]},
        "output": {"files": {"x": {"put": f"s3://{forge.bucket}/base-models/{base[0]}/x"}}},
    }
    mallory = t.as_("mallory")
    job = "grab-train-g1"
    cluster.kubectl(
        "annotate",
        "job",
        job,
        "-n",
        t.attacker,
        "--overwrite",
        f"medforge.io/job-plan={json.dumps(forged_plan)}",
        "medforge.io/url-lifetime-seconds=604800",
        f"medforge.io/base-model-digest=sha256:{'0' * 64}",
        mallory,
    )
    cluster.kubectl(
        "label",
        "job",
        job,
        "-n",
        t.attacker,
        "--overwrite",
        "medforge.io/owner=lung",
        f"medforge.io/owner-namespace={t.victim}",
        mallory,
    )
    cluster.kubectl(
        "patch",
        "job",
        job,
        "-n",
        t.attacker,
        "--type=merge",
        "-p",
        json.dumps({"metadata": {"ownerReferences": None}}),
        mallory,
    )
    bogus = base64.b64encode(json.dumps({"plan": forged_plan}).encode()).decode()
    cluster.kubectl(
        "patch",
        "secret",
        f"{job}-config",
        "-n",
        t.attacker,
        "--type=merge",
        "-p",
        json.dumps({"data": {"config.json": bogus}, "metadata": {"labels": {"x": "y"}}}),
        mallory,
    )
    # A restarted operator signs every running Job afresh: from the contribution, never from
    # what is written on the Job.
    operator.stop()
    operator.start()

    def resigned() -> dict[str, Any] | None:
        cfg = secret_config(cluster, t.attacker, f"{job}-config", mallory)
        return cfg if cfg and "plan" not in cfg else None

    again = wait_until(resigned, 60, what="the config signed again")
    assert {k for k, _ in signed(again)} == keys
    assert all(int(e) <= 3600 for _, e in signed(again))  # the setting, not the annotation
    st = wait_phase(cluster, t.attacker, "grab", "Succeeded", 90)
    assert st["baseModel"]["digest"] == base[1]  # the operator's record, not the annotation
    # Nothing signed anywhere in the attacker's namespace reaches beyond its own prefix.
    for cfg in every_config_in(cluster, t.attacker):
        for key, _ in signed(cfg):
            assert key.startswith((f"base-models/{base[0]}/", f"contributions/{t.attacker}/"))
    assert verified_bytes(forge, victim["artifact"]["uri"]) == before
    cluster.apply(t.victim, contribution("lung2", base))
    wait_phase(cluster, t.victim, "lung2", "Succeeded")  # everyone else goes on


def lookalike(name: str, owner: dict[str, Any] | None) -> str:
    meta: dict[str, Any] = {"name": name}
    if owner is not None:
        meta["labels"] = {
            "app.kubernetes.io/managed-by": "medforge-operator",
            "medforge.io/component": "train",
            "medforge.io/owner": owner["metadata"]["name"],
        }
        meta["ownerReferences"] = [
            {
                "apiVersion": "medforge.io/v1alpha1",
                "kind": "LoRAContribution",
                "name": owner["metadata"]["name"],
                "uid": owner["metadata"]["uid"],
                "controller": True,
            }
        ]
    return json.dumps(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": meta,
            "spec": {
                "backoffLimit": 0,
                "template": {
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [
                            {
                                "name": "train",
                                "image": "attacker",
                                "command": ["python", "-c", "import time; time.sleep(20)"],
                            }
                        ],
                    }
                },
            },
        }
    )


def test_a_look_alike_job_made_first_never_gets_a_config(
    cluster: ClusterAccess, forge: Forge, tenants: Tenants
) -> None:
    t = tenants
    root = t.as_("root")  # `admin` this time
    late = f"clip-late-{t.tag}"
    apply_as(cluster, t, "root", contribution("twin", (late, "")))
    apply_as(cluster, t, "root", contribution("squat", (late, "")))

    def waiting(name: str) -> Any:
        st = status(cluster, "lorac", t.attacker, name)
        return st if condition(st, "Stalled").get("reason") == "BaseModelNotFound" else None

    wait_until(lambda: waiting("twin"), 60, what="twin waiting for its base model")
    twin = get_json(cluster, "lorac", "twin", "-n", t.attacker)
    # Made before the operator's: one claims to be the operator's (labels and a controller
    # reference, all the tenant's to write); one does not.
    made = cluster.kubectl(
        "create",
        "-n",
        t.attacker,
        "-f",
        "-",
        "-o",
        "json",
        root,
        input=lookalike("twin-train-g1", twin),
    )
    fake_uid = json.loads(made.stdout)["metadata"]["uid"]
    cluster.kubectl(
        "create", "-n", t.attacker, "-f", "-", root, input=lookalike("squat-train-g1", None)
    )
    # The one that claims to be the operator's goes at once, before any config exists.
    wait_until(
        lambda: (
            cluster.kubectl("get", "job", "twin-train-g1", "-n", t.attacker, check=False).returncode
            != 0
        ),
        30,
        what="the look-alike removed",
    )
    out = cluster.kubectl("get", "secret", "twin-train-g1-config", "-n", t.attacker, check=False)
    assert out.returncode != 0 and "NotFound" in out.stderr
    name, digest = forge.upload_base_model(late)
    register_base_model(cluster, name, digest)

    st = wait_phase(cluster, t.attacker, "twin", "Succeeded", 120)
    assert st["job"]["uid"] != fake_uid
    secret = get_json(cluster, "secret", "twin-train-g1-config", "-n", t.attacker)
    assert secret["metadata"]["ownerReferences"][0]["uid"] == st["job"]["uid"]
    events = get_json(
        cluster, "events", "-n", t.attacker, "--field-selector=involvedObject.name=twin"
    )["items"]
    assert any(e["reason"] == "JobNotRecorded" for e in events), [e["reason"] for e in events]

    def taken() -> Any:
        st = status(cluster, "lorac", t.attacker, "squat")
        return st if condition(st, "Stalled").get("reason") == "JobNameTaken" else None

    wait_until(taken, 60, what="JobNameTaken")
    out = cluster.kubectl("get", "secret", "squat-train-g1-config", "-n", t.attacker, check=False)
    assert out.returncode != 0 and "NotFound" in out.stderr  # never given a config
    assert get_json(cluster, "job", "squat-train-g1", "-n", t.attacker)  # never touched


FORGED_POD = """
import pathlib, sys
pathlib.Path("/dev/termination-log").write_text(sys.argv[1])
"""


def test_forged_results_and_manifests_end_in_a_clear_status(
    cluster: ClusterAccess, tenants: Tenants, base: tuple[str, str], operator: OperatorProcess
) -> None:
    t = tenants
    apply_as(cluster, t, "mallory", contribution("forged", base, task="slow-12"))

    def training() -> dict[str, Any] | None:
        st = status(cluster, "lorac", t.attacker, "forged")
        return st if condition(st, "Ready").get("reason") == "Training" and st.get("job") else None

    st = wait_until(training, 60, what="training")
    # A pod of the tenant's own, labelled and owned as the Job's, writing a termination message
    # that is not a result: `{"artifact": "x"}` raised AttributeError in every round before.
    job = get_json(cluster, "job", "forged-train-g1", "-n", t.attacker)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "forged-result",
            "labels": {
                "batch.kubernetes.io/controller-uid": st["job"]["uid"],
                "job-name": "forged-train-g1",
            },
            "ownerReferences": [
                {
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "name": "forged-train-g1",
                    "uid": job["metadata"]["uid"],
                    "controller": True,
                }
            ],
        },
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "train",
                    "image": "attacker",
                    "command": ["python", "-c", FORGED_POD, json.dumps({"artifact": "x"})],
                }
            ],
        },
    }
    cluster.kubectl("apply", "-n", t.attacker, "-f", "-", t.as_("mallory"), input=json.dumps(pod))

    # The Job controller counts the forged pod as one of its own: it deletes it as a surplus
    # pod, or it ends first and its message is the newest success. Either way a clear verdict.
    def settled() -> dict[str, Any] | None:
        st = status(cluster, "lorac", t.attacker, "forged")
        return st if st.get("phase") in ("Failed", "Succeeded") else None

    st = wait_until(settled, 90, what="forged settled")
    if st["phase"] == "Failed":
        stalled = condition(st, "Stalled")
        assert stalled["reason"] == "InvalidResult" and "artifact" in stalled["message"], stalled
    else:
        assert st["artifact"]["digest"].startswith("sha256:"), st  # the real trainer's, verified

    # A manifest whose figures the CRD cannot hold, and one for another task than the spec's.
    apply_as(cluster, t, "mallory", contribution("floaty", base, task="float-epochs"))
    apply_as(cluster, t, "mallory", contribution("other-task", base, task="wrong-task"))
    st = wait_phase(cluster, t.attacker, "floaty", "Succeeded", 90)
    assert "epochs" not in st.get("training", {}) and st["training"]["loss"] == 0.42
    st = wait_phase(cluster, t.attacker, "other-task", "Failed", 90)
    assert condition(st, "Stalled")["reason"] == "InvalidManifest"
    assert "meta.task" in condition(st, "Stalled")["message"]
    cluster.apply(t.victim, contribution("lung", base))
    wait_phase(cluster, t.victim, "lung", "Succeeded")
    log = operator.log.read_text(errors="replace")
    assert "AttributeError" not in log and "Unprocessable" not in log
    assert "X-Amz-Signature" not in log


def test_overwriting_an_upload_after_verification_changes_nothing_anyone_reads(
    cluster: ClusterAccess,
    forge: Forge,
    tenants: Tenants,
    base: tuple[str, str],
    forge_namespace: str,
) -> None:
    t = tenants
    me = f"{forge_namespace}/pool"
    doc = json.loads(contribution("swap", base))
    doc["spec"]["sharing"] = {"forges": [me]}
    apply_as(cluster, t, "mallory", json.dumps(doc))
    st = wait_phase(cluster, t.attacker, "swap", "Succeeded")
    verified = verified_bytes(forge, st["artifact"]["uri"])
    assert st["artifact"]["uri"].startswith(f"s3://{forge.bucket}/verified/")
    # Its own PUT URLs, read from its own Secret, still live: the upload is overwritten.
    cfg = secret_config(cluster, t.attacker, "swap-train-g1-config", t.as_("mallory"))
    assert cfg is not None
    put = cfg["output"]["files"]["adapter.safetensors"]
    req = urllib.request.Request(put, data=b"poisoned after verification", method="PUT")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
    assert verified_bytes(forge, st["artifact"]["uri"]) == verified
    cluster.apply(
        forge_namespace,
        composite_manifest(
            "pool",
            base,
            {"medforge.io/test": "yes"},
            {"tenant": t.tag},
            strategy={"type": "linear"},
        ),
    )

    def revision() -> dict[str, Any] | None:
        st = status(cluster, "cmodel", forge_namespace, "pool")
        return st if (st.get("current") or {}).get("revision") == 1 else None

    cst = wait_until(revision, 90, what="revision 1")
    assert [(i["name"], i["state"]) for i in cst["inputs"]] == [("swap", "Included")]
    assert cst["current"]["uri"].startswith(f"s3://{forge.bucket}/verified/composites/")
    merge_cfg = every_config_in(cluster, forge_namespace)
    keys = {k for cfg in merge_cfg for k, _ in signed(cfg)}
    reads = {k for k in keys if not k.startswith("composites/")}
    assert reads and all(
        k.startswith((f"base-models/{base[0]}/", "verified/contributions/")) for k in reads
    ), reads


def test_a_flood_of_large_contributions_does_not_stop_the_others(
    cluster: ClusterAccess, tenants: Tenants, base: tuple[str, str]
) -> None:
    """As large as the CRD allows (1,000 classes of 128 characters, 64 node labels, 32
    tolerations), waiting on a BaseModel that never comes: polled, bounded, and no one else
    waits for them."""
    t = tenants
    docs = []
    for i in range(15):
        doc = json.loads(contribution(f"flood-{i}", (f"missing-{t.tag}", "")))
        doc["spec"]["task"]["classes"] = [f"{c:03d}" + "x" * 125 for c in range(1000)]
        doc["spec"]["resources"] = {
            "nodeSelector": {f"k{j}": "v" * 256 for j in range(64)},
            "tolerations": [{"key": f"t{j}", "operator": "Exists"} for j in range(32)],
        }
        docs.append(json.dumps(doc))
    for doc in docs:
        apply_as(cluster, t, "mallory", doc)
    too_big = json.loads(docs[0])
    too_big["metadata"]["name"] = "too-big"
    too_big["spec"]["task"]["classes"].append("y" * 129)
    out = cluster.kubectl(
        "apply",
        "-n",
        t.attacker,
        "-f",
        "-",
        t.as_("mallory"),
        input=json.dumps(too_big),
        check=False,
    )
    assert out.returncode != 0 and "spec.task.classes" in out.stderr, out.stderr
    cluster.apply(t.victim, contribution("lung", base))
    wait_phase(cluster, t.victim, "lung", "Succeeded", 90)
    st = status(cluster, "lorac", t.attacker, "flood-0")
    assert condition(st, "Stalled").get("reason") == "BaseModelNotFound"
