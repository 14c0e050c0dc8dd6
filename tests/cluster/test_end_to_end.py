"""The whole MedForge loop with the real programs: three hospitals train LoRA contributions with
`medforge-train` on data in their own S3 buckets (credentials in their own Secrets), and a
CompositeModel merges them with MedForge-Fusion through `medforge-merge`, revision after revision,
scored on the distilled sets; everything driven by the operator through the process kubelet. The
hospitals and the forge sign with their registered keys, and the pulled revision's chain of
custody checks offline."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.conftest import Forge, OperatorProcess, register_base_model
from tests.cluster.test_cli import medforge
from tests.cluster.test_composite import composite_doc, revision_state
from tests.cluster.test_operator import condition, wait_phase
from tests.cluster.test_signatures import institution, keypair, offline
from tests.conftest import ClusterAccess
from tests.merge_experiment import INSTITUTIONS
from tests.train_helpers import make_dataset, prepare, tiny_clip


@pytest.fixture
def real_operator(
    cluster: ClusterAccess,
    crds: None,
    forge: Forge,
    operator: OperatorProcess,
    tmp_path: Path,
) -> Iterator[OperatorProcess]:
    # The shared operator runs the stand-in programs; two operators must not reconcile the same
    # objects, so it pauses while this one runs the real trainer and merger.
    operator.stop()
    op = OperatorProcess(
        cluster,
        forge,
        tmp_path / "operator.log",
        MEDFORGE_TRAINER_COMMAND=json.dumps(["medforge-train"]),
        MEDFORGE_MERGER_COMMAND=json.dumps(["medforge-merge"]),
    )
    op.start()
    yield op
    op.stop()
    operator.start()


def contribution_doc(
    task: str, classes: list[str], base: tuple[str, str], data: str, endpoint: str, forge: str
) -> str:
    """A hospital's contribution, signed with the key in its Secret `signing-key`."""
    return json.dumps(
        {
            "apiVersion": "medforge.io/v1alpha1",
            "kind": "LoRAContribution",
            "metadata": {"name": task, "labels": {"medforge.io/test": "yes"}},
            "spec": {
                "baseModel": {"name": base[0], "digest": base[1]},
                "sharing": {"forges": [forge]},
                "signing": {"keySecretRef": {"name": "signing-key"}},
                "task": {"name": task, "classes": classes, "head": "clip-prompt"},
                "dataset": {
                    "uri": data,
                    "endpoint": endpoint,
                    "credentialsSecretRef": {"name": "imaging-data"},
                    "validationFraction": 0.25,
                },
                "lora": {
                    "rank": 4,
                    "alpha": 8,
                    "dropout": 0,
                    "targetModules": ["q_proj", "v_proj"],
                },
                "training": {"epochs": 4, "batchSize": 16, "learningRate": 0.005},
                "distillation": {"imagesPerClass": 4, "iterations": 60},
            },
        }
    )


def sign_for(cluster: ClusterAccess, ns: str, tmp: Path, registered: list[str]) -> None:
    """A key pair for the institution working in `ns`: its private key in the Secret
    `signing-key` there, its public key in an Institution (the platform team's)."""
    key, public = keypair(tmp, ns)
    cluster.kubectl(
        "-n", ns, "create", "secret", "generic", "signing-key", f"--from-file=private.pem={key}"
    )
    registered.append(ns)
    doc = institution(ns, ns, {"2026": (public, "Active")})
    cluster.kubectl("apply", "-f", "-", input=doc)


def test_three_hospitals_build_a_composite_with_fusion(
    cluster: ClusterAccess,
    forge_namespace: str,
    forge: Forge,
    real_operator: OperatorProcess,
    registered: list[str],
    tmp_path: Path,
) -> None:
    namespace = forge_namespace
    me = f"{namespace}/forge"
    from medforge_localcluster.s3 import client

    s3 = client(forge.endpoint, forge.access_key, forge.secret_key)
    base_dir = tiny_clip(tmp_path / "clip")
    digest = prepare(base_dir)
    forge.upload_model_dir("clip-e2e", base_dir)
    register_base_model(cluster, "clip-e2e", digest)
    base = ("clip-e2e", digest)

    tag = uuid.uuid4().hex[:6]
    spaces = []
    for i, (task, classes, style) in enumerate(INSTITUTIONS):
        ns = f"hospital-{tag}-{i}"
        spaces.append(ns)
        cluster.kubectl("create", "namespace", ns)
        cluster.kubectl(
            "label", "namespace", ns, f"medforge.io/forge={tag}", "medforge.io/member=true"
        )
        cluster.kubectl(
            "-n",
            ns,
            "create",
            "secret",
            "generic",
            "imaging-data",
            f"--from-literal=AWS_ACCESS_KEY_ID={forge.access_key}",
            f"--from-literal=AWS_SECRET_ACCESS_KEY={forge.secret_key}",
        )
        sign_for(cluster, ns, tmp_path, registered)
        bucket = f"{ns}-imaging"
        s3.create_bucket(Bucket=bucket)
        data = make_dataset(tmp_path / task, classes, 24, seed=i, style=style)
        for p in sorted(data.rglob("*.png")):
            s3.put_object(
                Bucket=bucket, Key=f"{task}/{p.relative_to(data).as_posix()}", Body=p.read_bytes()
            )

    sign_for(cluster, namespace, tmp_path, registered)
    doc = composite_doc(
        base,
        tag,
        strategy={"type": "fusion", "search": {"budget": 20, "seed": 1}},
        integration="incremental",
        minContributions=2,
        gate={"maxRegression": 1.0},
        requireSignatures=True,
        signing={"keySecretRef": {"name": "signing-key"}},
    )
    cluster.apply(namespace, doc)
    try:
        for i in range(2):
            task, classes, _ = INSTITUTIONS[i]
            cluster.apply(
                spaces[i],
                contribution_doc(
                    task, classes, base, f"s3://{spaces[i]}-imaging/{task}/", forge.endpoint, me
                ),
            )
        for i in range(2):
            st = wait_phase(cluster, spaces[i], INSTITUTIONS[i][0], "Succeeded", timeout=240)
            assert condition(st, "ArtifactVerified")["status"] == "True"
            assert st["metrics"]["accuracy"] > 0.5, st["metrics"]
            assert st["artifact"]["distilled"]["digest"].startswith("sha256:")
            assert st["artifact"]["signature"]["state"] == "Verified", st["artifact"]

        st = revision_state(cluster, namespace, 1, "Accepted")
        cur = st["current"]
        assert sorted(cur["metrics"]) == ["breakhis", "lung"]
        assert all(0 <= m["accuracy"] <= 1 and "solo" in m for m in cur["metrics"].values())
        assert sorted(i["state"] for i in st["inputs"]) == ["Included", "Included"]

        task, classes, _ = INSTITUTIONS[2]
        cluster.apply(
            spaces[2],
            contribution_doc(
                task, classes, base, f"s3://{spaces[2]}-imaging/{task}/", forge.endpoint, me
            ),
        )
        st = revision_state(cluster, namespace, 2, "Accepted")
        cur = st["current"]
        assert sorted(cur["metrics"]) == ["breakhis", "colon", "lung"]
        listed = cluster.kubectl("-n", namespace, "get", "cmodel", "forge").stdout
        assert "forge" in listed and str(st["current"].get("score", ""))[:3] in listed
        manifest = json.loads(
            s3.get_object(
                Bucket=forge.bucket,
                Key=cur["uri"].split(f"{forge.bucket}/", 1)[1] + "manifest.json",
            )["Body"].read()
        )
        assert manifest["meta"]["strategy"] == "fusion" and len(manifest["meta"]["steps"]) == 1
        # Revision 1 took the first two in the order they became Ready (which of the two
        # trains faster varies from run to run); colon arrived last.
        tasks = manifest["meta"]["tasks"]
        assert sorted(tasks[:2]) == ["breakhis", "lung"] and tasks[2] == "colon"
        assert cur["signature"]["state"] == "Verified"
        out, trust = tmp_path / "pulled", tmp_path / "trust.json"
        pulled = medforge(cluster, forge, "composite", "pull", "forge", "-n", namespace,
                          "--format", "raw", "-o", str(out))  # fmt: skip
        assert pulled.returncode == 0, pulled.stderr
        exported = medforge(cluster, forge, "institution", "export", "-o", str(trust))
        assert exported.returncode == 0, exported.stderr
        # The merged revision 2 holds colon's update only (incremental): its statement names
        # colon; revision 1's inputs are in revision 1's own statement.
        ok = offline("composite", "verify", "forge", "-n", namespace, "--dir", str(out),
                     "--trust", str(trust), "--revision", "2")  # fmt: skip
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert f"input {spaces[2]}/colon: signed by {spaces[2]}" in ok.stdout
    except AssertionError:
        print(real_operator.tail(80))
        raise
    finally:
        for ns in spaces:
            cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
