"""The MedForge loop on the local cluster, for `make demo`: two hospitals train LoRA
contributions on their own (synthetic) data with the real `medforge-train`, and a CompositeModel
merges them with MedForge-Fusion through the real `medforge-merge`, driven by the operator.

Everything is built on the spot (a tiny CLIP from a config, generated images): nothing is
downloaded. The operator runs for the demo only; the objects stay for you to inspect."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CRDS = Path(__file__).resolve().parents[2] / "crds"
HOSPITALS = [
    ("breakhis", ["benign", "malignant"], 0),
    ("lung", ["adenocarcinoma", "benign tissue", "squamous"], 1),
]
Kubectl = Callable[..., str]


def _upload_dir(s3: Any, bucket: str, directory: Path, prefix: str) -> None:
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            s3.put_object(
                Bucket=bucket, Key=prefix + p.relative_to(directory).as_posix(), Body=p.read_bytes()
            )


def _doc(kind: str, name: str, namespace: str, spec: dict[str, Any]) -> str:
    meta = {"name": name, "namespace": namespace} if namespace else {"name": name}
    return json.dumps(
        {"apiVersion": "medforge.io/v1alpha1", "kind": kind, "metadata": meta, "spec": spec}
    )


def _install_crds(k: Kubectl, step: Callable[[str], None]) -> None:
    step(f"installing the CRDs from {CRDS}")
    print(k("apply", "-f", str(CRDS)), end="")
    k(
        "wait",
        "--for=condition=Established",
        "crd/loracontributions.medforge.io",
        "crd/compositemodels.medforge.io",
        "crd/basemodels.medforge.io",
        "crd/evaluationsets.medforge.io",
        "crd/institutions.medforge.io",
        "--timeout=60s",
    )


def _fill_store(s3: Any, bucket: str, tag: str) -> str:
    """A tiny CLIP (built from a config) and each hospital's images, into S3; the model's
    manifest digest."""
    from medforge_ml.basemodel import prepare_model_dir
    from medforge_ml.synthetic import make_dataset, tiny_clip

    with tempfile.TemporaryDirectory(prefix="medforge-demo-") as tmp:
        base_dir = tiny_clip(Path(tmp) / "clip")
        prepare_model_dir(base_dir, "make demo")
        digest = "sha256:" + hashlib.sha256((base_dir / "manifest.json").read_bytes()).hexdigest()
        _upload_dir(s3, bucket, base_dir, f"base-models/clip-demo-{tag}/")
        for task, classes, style in HOSPITALS:
            data = make_dataset(Path(tmp) / task, classes, 24, seed=style, style=style)
            _upload_dir(s3, bucket, data, f"hospitals/{tag}/{task}/")
            # Held-out patients, never trained on: the hospital's own evaluation set.
            held = make_dataset(
                Path(tmp) / f"{task}-held", classes, 12, seed=50 + style, style=style
            )
            for p in held.rglob("*.png"):  # other patients, other file names
                p.rename(p.with_name(f"held-{p.name}"))
            _upload_dir(s3, bucket, held, f"hospitals/{tag}/{task}-heldout/")
    return digest


def _register(
    k: Kubectl, base: dict[str, str], forge_ns: str, tag: str, creds: dict[str, str]
) -> None:
    """What the platform team does: the BaseModel, member namespaces, the hospitals' Secrets."""
    bm = {"path": base["name"], "digest": base["digest"]}
    print(k("apply", "-f", "-", input=_doc("BaseModel", base["name"], "", bm)), end="")
    for ns in (forge_ns, *(f"hospital-{task}-{tag}" for task, _, _ in HOSPITALS)):
        k("create", "namespace", ns)
        k("label", "namespace", ns, f"medforge.io/forge=demo-{tag}", "medforge.io/member=true")
    for task, _, _ in HOSPITALS:
        # The demo's hospitals read their data with the store's own keys; in real use each
        # hospital's Secret holds credentials for its own bucket only.
        k(
            "-n",
            f"hospital-{task}-{tag}",
            "create",
            "secret",
            "generic",
            "imaging-data",
            f"--from-literal=AWS_ACCESS_KEY_ID={creds['access_key']}",
            f"--from-literal=AWS_SECRET_ACCESS_KEY={creds['secret_key']}",
        )


def _signing_keys(k: Kubectl, forge_ns: str, tag: str, work: Path) -> None:
    """What each institution and the platform team do for signatures: an EC key pair per
    hospital and one for the forge; the private key into a Secret in its own namespace (only
    its training or merge Job mounts it), the public key into an Institution."""
    from medforge_common.attestation import new_key_pair

    owners = [(forge_ns, f"forge-{tag}")]
    owners += [(f"hospital-{task}-{tag}", f"hospital-{task}-{tag}") for task, _, _ in HOSPITALS]
    for ns, name in owners:
        private, public = new_key_pair()
        pem = work / f"{name}.pem"
        pem.write_bytes(private)
        k("-n", ns, "create", "secret", "generic", "signing-key", f"--from-file=private.pem={pem}")
        pem.unlink()
        inst = {"namespace": ns, "displayName": name, "keys": [
            {"name": "2026", "publicKey": public.decode()}]}  # fmt: skip
        print(k("apply", "-f", "-", input=_doc("Institution", name, "", inst)), end="")


def _verify_offline(env_: dict[str, str], forge_ns: str, work: Path) -> None:
    """Pull revision 1 (verified against the cluster's Institutions), export the trust file
    and check the chain again with nothing but the files and that file."""
    env = dict(os.environ) | env_
    work.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "medforge_cli"]
    out, trust = work / "revision-1", work / "trust.json"
    for args in (
        ["composite", "pull", "forge", "-n", forge_ns, "--format", "raw", "-o", str(out)],
        ["institution", "export", "-o", str(trust)],
        ["composite", "verify", "forge", "-n", forge_ns, "--dir", str(out), "--trust", str(trust)],
    ):
        print(f"  $ medforge {' '.join(args)}")
        done = subprocess.run([*cli, *args], env=env, capture_output=True, text=True, check=False)
        print("".join(f"    {line}\n" for line in (done.stdout + done.stderr).splitlines()), end="")
        if done.returncode != 0:
            raise RuntimeError(f"medforge {args[0]} {args[1]} failed: {done.stderr.strip()}")


def _start_operator(env_: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(env_ | {"PYTHONUNBUFFERED": "1"})
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "medforge_operator"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )


def _apply(
    k: Kubectl, base: dict[str, str], forge_ns: str, tag: str, bucket: str, endpoint: str
) -> None:
    composite = {
        "baseModel": {"name": base["name"]},
        "contributions": {
            "selector": {"matchLabels": {"medforge.io/demo": tag}},
            "namespaceSelector": {"matchLabels": {"medforge.io/forge": f"demo-{tag}"}},
        },
        "strategy": {"type": "fusion", "search": {"budget": 20}},
        "minContributions": 2,
        # Only adapters signed by their hospital's registered key; each revision signed too.
        "requireSignatures": True,
        "signing": {"keySecretRef": {"name": "signing-key"}},
        # Each hospital scores every candidate on its own held-out images before it is served.
        "gate": {"sites": {"quorum": "100%", "maxRegression": 0.05, "timeout": "5m"}},
    }
    print(k("apply", "-f", "-", input=_doc("CompositeModel", "forge", forge_ns, composite)), end="")
    for task, classes, _ in HOSPITALS:
        data: dict[str, Any] = {
            "uri": f"s3://{bucket}/hospitals/{tag}/{task}/",
            "endpoint": endpoint,
            "credentialsSecretRef": {"name": "imaging-data"},
        }
        spec = {
            "baseModel": base,
            # The hospital opts in to this forge; no other composite may merge it.
            "sharing": {"forges": [f"{forge_ns}/forge"]},
            "signing": {"keySecretRef": {"name": "signing-key"}},
            "task": {"name": task, "classes": classes},
            "dataset": data,
            "lora": {"rank": 4, "alpha": 8, "targetModules": ["q_proj", "v_proj"]},
            "training": {"epochs": 4, "batchSize": 16, "learningRate": 0.005},
            "distillation": {"imagesPerClass": 4, "iterations": 60},
        }
        doc = json.loads(_doc("LoRAContribution", task, f"hospital-{task}-{tag}", spec))
        doc["metadata"]["labels"] = {"medforge.io/demo": tag}
        print(k("apply", "-f", "-", input=json.dumps(doc)), end="")
        dataset = data | {"uri": f"s3://{bucket}/hospitals/{tag}/{task}-heldout/"}
        held = {
            "task": {"name": task, "classes": classes},
            "dataset": dataset,
            "forges": [f"{forge_ns}/forge"],
            "minSamples": 20,
        }
        ev = _doc("EvaluationSet", "held-out", f"hospital-{task}-{tag}", held)
        print(k("apply", "-f", "-", input=ev), end="")


def _follow(
    k: Kubectl, op: subprocess.Popen[bytes], forge_ns: str, tag: str, log: Path
) -> dict[str, Any]:
    """Print each change of phase until revision 1 is there; the composite's status."""
    deadline = time.monotonic() + 300
    seen = ""
    while time.monotonic() < deadline:
        if op.poll() is not None:
            raise RuntimeError(f"the operator exited; see {log}")
        phases = []
        for task, _, _ in HOSPITALS:
            obj = json.loads(k("get", "lorac", task, "-n", f"hospital-{task}-{tag}", "-o", "json"))
            phases.append(f"{task} {(obj.get('status') or {}).get('phase', 'Pending')}")
        st: dict[str, Any] = (
            json.loads(k("get", "cmodel", "forge", "-n", forge_ns, "-o", "json")).get("status")
            or {}
        )
        line = ", ".join(phases) + f"; composite {st.get('phase', 'Pending')}"
        if line != seen:
            print(f"  {time.strftime('%H:%M:%S')} {line}", flush=True)
            seen = line
        if (st.get("current") or {}).get("revision"):
            return st
        time.sleep(2)
    raise RuntimeError(f"no revision after 5 minutes; see {log}")


def _report(k: Kubectl, st: dict[str, Any], forge_ns: str, tag: str) -> None:
    for task, _, _ in HOSPITALS:
        print(k("get", "lorac", "-n", f"hospital-{task}-{tag}"), end="")
    print(k("get", "cmodel", "-n", forge_ns), end="")
    cur = st["current"]
    for i in st.get("inputs") or []:
        print(f"  {i['namespace']}/{i['name']}: {i['state']}, coefficient {i.get('coefficient')}")
    print(f"  composite {cur['uri']} ({cur['digest'][:19]}...), score {cur.get('score')}")
    for task, m in (cur.get("metrics") or {}).items():
        print(
            f"  {task}: accuracy {m.get('accuracy')} (the hospital's adapter alone: "
            f"{m.get('solo')}), macro-F1 {m.get('f1')}, AUC {m.get('auc')}"
        )
    print("  each hospital's own held-out patients (revision x site; EvaluationSets):")
    print(f"  {'REVISION':<9} {'SITE':<36} {'STATE':<12} {'ACC':>6} {'F1':>6} {'AUC':>6} {'N':>4}")
    for h in st.get("history") or []:
        for site in h.get("sites") or []:
            c = site.get("candidate") or {}
            figs = [f"{c[k]:.3f}" if k in c else "-" for k in ("accuracy", "f1", "auc")]
            print(
                f"  {h['revision']:<9} {site['site']:<36} {site['state']:<12} "
                f"{figs[0]:>6} {figs[1]:>6} {figs[2]:>6} {c.get('samples', '-'):>4}"
            )


def run(
    k: Kubectl,
    s3: Any,
    bucket: str,
    endpoint: str,
    creds: dict[str, str],
    kubeconfig: Path,
    log_dir: Path,
    step: Callable[[str], None],
) -> None:
    tag = time.strftime("%H%M%S")
    forge_ns = f"forge-{tag}"
    _install_crds(k, step)
    step("a tiny CLIP base model (built from a config) and each hospital's images, into S3")
    base = {"name": f"clip-demo-{tag}", "digest": _fill_store(s3, bucket, tag)}
    step("the platform team registers the base model and the namespaces")
    _register(k, base, forge_ns, tag, creds)
    step("each hospital and the forge get a signing key; the platform team registers them")
    _signing_keys(k, forge_ns, tag, log_dir)
    step("starting medforge-operator with the real trainer and merger")
    log = log_dir / "demo-operator.log"
    env = {
        "KUBECONFIG": str(kubeconfig),
        "MEDFORGE_STORE_ENDPOINT": endpoint,
        "MEDFORGE_STORE_BUCKET": bucket,
        "MEDFORGE_STORE_ACCESS_KEY_ID": creds["access_key"],
        "MEDFORGE_STORE_SECRET_ACCESS_KEY": creds["secret_key"],
    }
    op = _start_operator(env | {"MEDFORGE_FORGE_NAMESPACES": forge_ns}, log)
    try:
        step(f"kubectl apply: a CompositeModel in {forge_ns} and a LoRAContribution per hospital")
        _apply(k, base, forge_ns, tag, bucket, endpoint)
        step("training, verifying and merging (about a minute)")
        st = _follow(k, op, forge_ns, tag, log)
        step("revision 1: what was merged, its scores on the distilled sets and at each site")
        _report(k, st, forge_ns, tag)
        step("the chain of custody: revision 1 pulled, then checked offline against the keys")
        _verify_offline(env, forge_ns, log_dir / f"chain-{tag}")
    finally:
        op.terminate()
        op.wait(30)
    step("try it yourself")
    print(
        f"  kubectl get lorac -A; kubectl describe cmodel forge -n {forge_ns}\n"
        f"  kubectl get events -n {forge_ns}\n  (operator log of the demo: {log})"
    )
