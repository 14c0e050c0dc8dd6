"""Signed contributions and attested revisions on the local cluster. The platform team registers
a hospital's and the forge's keys as Institutions; the hospital's private keys are Secrets in its
namespace, mounted into its training Jobs only. A composite with spec.requireSignatures merges
the contribution signed with the hospital's Active key and excludes, each with its reason, one
tampered after signing with its manifest rewritten to match (SignatureInvalid), one signed with
another hospital's key and one signed with a key revoked since (UnknownSigner), and an unsigned
one (Unsigned). The forge signs the revision; `medforge composite pull` verifies it against the
cluster's Institutions, and `medforge composite verify` checks the pulled folder offline, in a
network namespace with no network: it passes, and fails on a tampered file and on a forge
statement re-signed with a swapped input signer."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from medforge_common import attestation as at
from medforge_localcluster.s3 import client
from medforge_ml import synthetic
from tests.builders import contribution
from tests.cluster.conftest import Forge, OperatorProcess, base_model
from tests.cluster.test_cli import medforge
from tests.cluster.test_composite import composite_doc
from tests.cluster.test_operator import status, wait_phase
from tests.conftest import ClusterAccess
from tests.helpers import wait_until

pytestmark = pytest.mark.usefixtures("operator")


def keypair(tmp: Path, name: str) -> tuple[Path, str]:
    """A private key file and its public PEM."""
    private, public = at.new_key_pair()
    path = tmp / f"{name}.pem"
    path.write_bytes(private)
    return path, public.decode()


def institution(name: str, ns: str, keys: dict[str, tuple[str, str]]) -> str:
    return json.dumps(
        {
            "apiVersion": "medforge.io/v1alpha1",
            "kind": "Institution",
            "metadata": {"name": name},
            "spec": {
                "namespace": ns,
                "displayName": name,
                "keys": [
                    {"name": n, "publicKey": pem, "state": state}
                    for n, (pem, state) in keys.items()
                ],
            },
        }
    )


def secret(cluster: ClusterAccess, ns: str, name: str, key: Path) -> None:
    cluster.kubectl("create", "secret", "generic", name, f"--from-file=private.pem={key}", "-n", ns)


def signature(cluster: ClusterAccess, ns: str, name: str) -> dict[str, Any]:
    st = wait_phase(cluster, ns, name, "Succeeded")
    return dict(st["artifact"]["signature"])


def offline(*args: str) -> subprocess.CompletedProcess[str]:
    """`medforge` in a network namespace of its own, with no interface but a down loopback."""
    return subprocess.run(
        ["unshare", "-rn", sys.executable, "-m", "medforge_cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_signatures_from_training_to_an_offline_check(
    cluster: ClusterAccess,
    operator: OperatorProcess,
    namespace: str,
    forge_namespace: str,
    forge: Forge,
    registered: list[str],
    tmp_path: Path,
) -> None:
    ns, fns = namespace, forge_namespace
    key_a, pub_a = keypair(tmp_path, "a")
    key_old, pub_old = keypair(tmp_path, "old")
    key_b, pub_b = keypair(tmp_path, "b")
    key_f, pub_f = keypair(tmp_path, "forge")
    for name, doc in (
        (f"{ns}-hospital", institution(f"{ns}-hospital", ns, {
            "current": (pub_a, "Active"), "old": (pub_old, "Active")})),
        (f"{ns}-other", institution(f"{ns}-other", f"{ns}-other", {"k": (pub_b, "Active")})),
        (f"{fns}-forge", institution(f"{fns}-forge", fns, {"k": (pub_f, "Active")})),
    ):  # fmt: skip
        registered.append(name)
        cluster.kubectl("apply", "-f", "-", input=doc)

    def institution_status() -> dict[str, Any]:
        got = cluster.kubectl("get", "institution", f"{ns}-hospital", "-o", "json").stdout
        return dict(json.loads(got).get("status") or {})

    st = wait_until(lambda: institution_status().get("activeKeys") == 2 and institution_status(),
                    60, what="the Institution's status")  # fmt: skip

    assert st["conditions"][0]["reason"] == "KeysValid"
    assert {k["keyId"] for k in st["keys"]} == {
        at.key_id(pub_a.encode()),
        at.key_id(pub_old.encode()),
    }
    for name, key in (("key-a", key_a), ("key-old", key_old), ("key-b", key_b)):
        secret(cluster, ns, name, key)
    secret(cluster, fns, "forge-key", key_f)
    base = base_model(cluster, forge, "clip-signed")
    share = {"sharing": {"forges": [f"{fns}/forge"]}}

    def signed(name: str, task: str, key: str | None) -> str:
        signing = {"signing": {"keySecretRef": {"name": key}}} if key else {}
        return contribution(name, base, task, **share, **signing)

    cluster.apply(ns, signed("good", "lung", "key-a"))
    cluster.apply(ns, signed("tampered", "tamper-signed-lung", "key-a"))
    cluster.apply(ns, signed("foreign", "skin", "key-b"))
    cluster.apply(ns, signed("rotated", "eye", "key-old"))
    cluster.apply(ns, signed("plain", "bone", None))

    good = signature(cluster, ns, "good")
    assert good["state"] == "Verified" and good["institution"] == f"{ns}-hospital"
    assert good["keyId"] == at.key_id(pub_a.encode())
    assert signature(cluster, ns, "tampered")["state"] == "SignatureInvalid"
    assert signature(cluster, ns, "foreign")["state"] == "UnknownSigner"
    assert signature(cluster, ns, "rotated")["state"] == "Verified"
    assert signature(cluster, ns, "plain")["state"] == "Unsigned"

    def warned() -> set[str]:
        got = cluster.kubectl("get", "events", "-n", ns, "-o", "json").stdout
        return {
            f"{e['involvedObject']['name']}:{e['reason']}"
            for e in json.loads(got)["items"]
            if e["type"] == "Warning"
        }

    # The hospital hears why at once; an unsigned contribution (no spec.signing) is not warned.
    want = {"foreign:UnknownSigner", "tampered:SignatureInvalid"}
    seen = wait_until(
        lambda: warned() if want <= warned() else None, 30, what="the signature warnings"
    )
    assert not any(w.startswith("plain:") for w in seen), seen
    # Tampering is a security event for the platform team too (MedForgeVerificationFailures).
    scraped = urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/metrics").read()
    assert (
        b'medforge_artifact_verification_failures_total{kind="contribution",'
        b'reason="SignatureInvalid"}' in scraped
    )
    # The key is mounted into the training Job only, never into the operator's view.
    job = json.loads(cluster.kubectl("get", "job", "good-train-g1", "-n", ns, "-o", "json").stdout)
    vols = job["spec"]["template"]["spec"]["volumes"]
    assert any(v.get("secret", {}).get("secretName") == "key-a" for v in vols), vols

    # The platform team rotates: the old key is revoked before the composite merges.
    rotated = institution(f"{ns}-hospital", ns, {
        "current": (pub_a, "Active"), "old": (pub_old, "Revoked")})  # fmt: skip
    cluster.kubectl("apply", "-f", "-", input=rotated)
    cluster.apply(
        fns,
        composite_doc(
            base, None, minContributions=1, requireSignatures=True,
            signing={"keySecretRef": {"name": "forge-key"}},
        ),
    )  # fmt: skip

    def verdicts() -> dict[str, Any] | None:
        st = status(cluster, "cmodel", fns, "forge")
        found = {i["name"]: i["reason"] for i in st.get("inputs") or [] if i["namespace"] == ns}
        return st if (st.get("current") and len(found) == 5) else None

    st = wait_until(verdicts, 120, what="the composite's verdicts")
    found = {i["name"]: i["reason"] for i in st["inputs"] if i["namespace"] == ns}
    assert found == {
        "good": "Merged",
        "tampered": "SignatureInvalid",
        "foreign": "UnknownSigner",
        "rotated": "UnknownSigner",
        "plain": "Unsigned",
    }
    forge_sig = st["current"]["signature"]
    assert forge_sig["state"] == "Verified" and forge_sig["institution"] == f"{fns}-forge"

    # Pulled, the revision verifies against the cluster's Institutions by default.
    out = tmp_path / "pulled"
    pulled = medforge(cluster, forge, "composite", "pull", "forge", "-n", fns,
                      "--format", "raw", "-o", str(out))  # fmt: skip
    assert pulled.returncode == 0, pulled.stderr
    assert "chain of custody holds" in pulled.stdout
    exported = medforge(cluster, forge, "institution", "export", "-o", str(tmp_path / "trust.json"))
    assert exported.returncode == 0, exported.stderr
    check = ("composite", "verify", "forge", "-n", fns, "--dir", str(out),
             "--trust", str(tmp_path / "trust.json"))  # fmt: skip
    ok = offline(*check)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"input {ns}/good: signed by {ns}-hospital" in ok.stdout

    # A forge statement re-signed with the forge's own key, but naming hospital-b's bundle for
    # the good input: the chain breaks at that input.
    bundle = json.loads((out / at.SIGNATURE_FILE).read_bytes())
    stmt = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    foreign_bundle = _foreign_bundle(stmt["predicate"]["inputs"][0]["digest"], key_b)
    stmt["predicate"]["inputs"][0]["signature"] = foreign_bundle
    stmt["predicate"]["inputs"][0]["signer"]["keyId"] = at.key_id(pub_b.encode())
    swapped = tmp_path / "swapped"
    shutil.copytree(out, swapped)
    (swapped / at.SIGNATURE_FILE).write_bytes(at.sign_statement(stmt, key_f.read_bytes()))
    bad = offline(*check[:5], "--dir", str(swapped), *check[7:])
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert f"broken at input {ns}/good" in bad.stderr and "UnknownSigner" in bad.stderr

    # A tampered file: the forge's statement no longer covers it.
    adapter = out / "adapter.safetensors"
    adapter.write_bytes(adapter.read_bytes()[::-1])
    tampered = offline(*check)
    assert tampered.returncode == 1
    assert "broken at revision signature" in tampered.stderr
    assert "adapter.safetensors" in tampered.stderr


def _foreign_bundle(manifest_digest: str, key: Path) -> dict[str, Any]:
    """A model signature over the same manifest digest, made with another hospital's key."""
    files = {"manifest.json": manifest_digest.removeprefix("sha256:")}
    raw = at.sign_statement(at.statement("out", files, at.MODEL_PREDICATE, {}), key.read_bytes())
    return dict(json.loads(raw))


def test_a_signed_base_model_is_checked_at_registration_and_offline(
    cluster: ClusterAccess, forge: Forge, registered: list[str], tmp_path: Path
) -> None:
    """`model push --sign-key --register` signs the model and registers its public key; the
    operator checks the bundle before the BaseModel is Ready. A file changed in the store with
    the manifest rewritten to match fails the signature (SignatureInvalid); `model verify`
    checks the signature from the store and, offline, a local folder against the trust file."""
    model = synthetic.tiny_clip(tmp_path / "clip")
    key, public = keypair(tmp_path, "platform")
    name = f"clip-signed-{uuid.uuid4().hex[:6]}"
    pushed = medforge(cluster, forge, "model", "push", str(model), "--name", name,
                      "--register", "--sign-key", str(key))  # fmt: skip
    assert pushed.returncode == 0, pushed.stderr
    waited = medforge(cluster, forge, "wait", "basemodel", name, "--timeout", "60")
    assert waited.returncode == 0, waited.stdout + waited.stderr
    bm = json.loads(cluster.kubectl("get", "basemodel", name, "-o", "json").stdout)
    assert bm["spec"]["publicKey"] == public
    assert bm["status"]["signature"] == {"state": "Verified", "keyId": at.key_id(public.encode())}
    trust = tmp_path / "trust.json"
    assert medforge(cluster, forge, "institution", "export", "-o", str(trust)).returncode == 0
    ok = medforge(cluster, forge, "model", "verify", name, "--trust", str(trust))
    assert ok.returncode == 0 and "signed by key" in ok.stdout, ok.stdout + ok.stderr
    # Offline, a local folder with the bundle beside it, in a namespace with no network.
    local = tmp_path / "local"
    shutil.copytree(model, local)
    s3 = client(forge.endpoint, forge.access_key, forge.secret_key)
    for f in ("manifest.json", at.SIGNATURE_FILE):
        body = s3.get_object(Bucket=forge.bucket, Key=f"base-models/{name}/{f}")["Body"].read()
        (local / f).write_bytes(body)
    held = offline("model", "verify", name, "--dir", str(local), "--trust", str(trust))
    assert held.returncode == 0, held.stdout + held.stderr
    (local / "config.json").write_text("{}")
    broken = offline("model", "verify", name, "--dir", str(local), "--trust", str(trust))
    assert broken.returncode == 1 and "config.json" in broken.stderr, broken.stderr

    # Another model pushed with the same key, then a file changed in the store and its
    # manifest rewritten to match: the digests hold, the signature does not.
    other = f"{name}-b"
    pushed = medforge(cluster, forge, "model", "push", str(model), "--name", other,
                      "--sign-key", str(key))  # fmt: skip
    assert pushed.returncode == 0, pushed.stderr
    prefix = f"base-models/{other}/"
    manifest = json.loads(
        s3.get_object(Bucket=forge.bucket, Key=prefix + "manifest.json")["Body"].read()
    )
    changed = b'{"changed": true}'
    for entry in manifest["files"]:
        if entry["name"] == "config.json":
            entry["sha256"], entry["size"] = hashlib.sha256(changed).hexdigest(), len(changed)
    s3.put_object(Bucket=forge.bucket, Key=prefix + "config.json", Body=changed)
    s3.put_object(
        Bucket=forge.bucket, Key=prefix + "manifest.json", Body=json.dumps(manifest).encode()
    )
    doc = {"apiVersion": "medforge.io/v1alpha1", "kind": "BaseModel", "metadata": {"name": other},
           "spec": {"path": other, "publicKey": public}}  # fmt: skip
    cluster.kubectl("apply", "-f", "-", input=json.dumps(doc))

    def failed() -> dict[str, Any] | None:
        got = json.loads(cluster.kubectl("get", "basemodel", other, "-o", "json").stdout)
        st = got.get("status") or {}
        return st if st.get("phase") == "Failed" else None

    st = wait_until(failed, 60, what="the tampered base model refused")
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "SignatureInvalid" and "config.json" in ready["message"]
    cluster.kubectl("delete", "basemodel", name, other, "--wait=false", check=False)
