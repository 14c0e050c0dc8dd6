"""The operator's side of signatures, without a cluster: an Institution's status and the keys it
trusts for its namespace, the verdict on a contribution's bundle (from the manifest it hashed,
never a local folder), the composite's spec.requireSignatures reasons, and where the hospital's
key may go (its training Job only) and what the grants let a Job upload."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from medforge_common import attestation as at
from medforge_common.api import InputReason
from medforge_common.artifacts import MANIFEST_FILE
from medforge_common.manifest import FileEntry, Manifest, digest_of
from medforge_operator import composite, contribution, evaluation, institution, signatures, signing
from medforge_operator.composite import mergejob
from tests.unit.test_composite_logic import BASE, SETTINGS, comp
from tests.unit.test_composite_logic import contribution as ready_contribution
from tests.unit.test_evaluation_jobs import composite as served_composite
from tests.unit.test_evaluation_jobs import evs

pytestmark = pytest.mark.unit
JSON = dict[str, Any]


def pem_pair(curve: ec.EllipticCurve | None = None) -> tuple[bytes, bytes]:
    return at.new_key_pair(curve.key_size if curve else 256)


def inst(name: str, ns: str, keys: list[JSON], gen: int = 1) -> JSON:
    return {
        "metadata": {"name": name, "generation": gen},
        "spec": {"namespace": ns, "keys": keys},
    }


def test_an_institution_reports_its_keys_and_trusts_only_active_ones_for_its_namespace() -> None:
    _, a = pem_pair()
    _, b = pem_pair(ec.SECP384R1())
    _, c = pem_pair()
    rsa_pub = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    good = inst(
        "hospital-a",
        "hospital-a",
        [
            {"name": "old", "publicKey": a.decode(), "state": "Revoked"},
            {"name": "new", "publicKey": b.decode()},
        ],
    )
    st = institution.status(good, "t")
    ready = st["conditions"][0]
    assert (ready["status"], ready["reason"], st["activeKeys"]) == ("True", "KeysValid", 1)
    assert [(k["name"], k["curve"]) for k in st["keys"]] == [("old", "P-256"), ("new", "P-384")]
    assert st["keys"][1]["keyId"] == at.key_id(b)
    bad = inst("b", "hospital-b", [{"name": "rsa", "publicKey": rsa_pub.decode()}])
    st = institution.status(bad, "t")
    assert st["conditions"][0]["reason"] == "InvalidKey"
    assert "spec.keys[rsa].publicKey" in st["conditions"][0]["message"]
    revoked = inst("c", "hospital-c", [{"name": "k", "publicKey": c.decode(), "state": "Revoked"}])
    assert institution.status(revoked)["conditions"][0]["reason"] == "NoActiveKey"
    every = [good, bad, revoked]
    assert [k.key_id for k in institution.trusted(every, "hospital-a")] == [at.key_id(b)]
    assert institution.trusted(every, "hospital-b") == []  # unusable keys never trusted
    assert institution.trusted(every, "nowhere") == []
    assert institution.active_ids(every) == {
        "hospital-a": frozenset({at.key_id(b)}),
        "hospital-b": frozenset(),
        "hospital-c": frozenset(),
    }


def manifest_of(files: dict[str, bytes]) -> tuple[Manifest, bytes]:
    m = Manifest(
        "contribution",
        BASE.digest,
        [FileEntry(n, hashlib.sha256(d).hexdigest(), len(d)) for n, d in sorted(files.items())],
    )
    raw = m.to_json().encode()
    return m, raw


def bundle(files: dict[str, bytes], manifest_raw: bytes, private: bytes) -> bytes:
    digests = {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}
    digests[MANIFEST_FILE] = hashlib.sha256(manifest_raw).hexdigest()
    stmt = at.statement("out", digests, at.MODEL_PREDICATE, {})
    return at.sign_statement(stmt, private)


def test_the_verdict_on_a_bundle_comes_from_the_digests_the_operator_computed() -> None:
    private, public = pem_pair()
    other_private, _ = pem_pair()
    files = {"adapter.safetensors": b"\x01" * 64}
    manifest, raw = manifest_of(files)
    keys = [at.TrustedKey(at.key_id(public), public, "hospital-a", "hospital-a")]
    good = bundle(files, raw, private)
    verdict = signatures.judge(good, manifest, digest_of(raw), keys, "hospital-a")
    assert verdict["state"] == "Verified" and verdict["institution"] == "hospital-a"
    assert verdict["keyId"] == at.key_id(public) and verdict["digest"] == digest_of(good)
    # Bytes changed and the manifest rewritten to match: the signed digests no longer agree.
    tampered = {"adapter.safetensors": b"\x02" * 64}
    t_manifest, t_raw = manifest_of(tampered)
    bad = signatures.judge(good, t_manifest, digest_of(t_raw), keys, "hospital-a")
    assert bad["state"] == "SignatureInvalid" and "adapter.safetensors" in bad["message"]
    # Another hospital's key signs the same files: not a key of this namespace.
    foreign = signatures.judge(
        bundle(files, raw, other_private), manifest, digest_of(raw), keys, "hospital-a"
    )
    assert foreign["state"] == "UnknownSigner"
    # No key registered at all.
    assert signatures.judge(good, manifest, digest_of(raw), [], "x")["state"] == "UnknownSigner"
    garbage = signatures.judge(b"{not json", manifest, digest_of(raw), keys, "x")
    assert garbage["state"] == "SignatureInvalid"


def signed(c: JSON, state: str, key_id: str = "k1") -> JSON:
    c["status"]["artifact"]["signature"] = {"state": state, "keyId": key_id}
    return c


def test_require_signatures_excludes_each_input_with_its_reason() -> None:
    d = ["sha256:" + ch * 64 for ch in "12345"]
    good = signed(ready_contribution("good", d[0], "t1"), "Verified")
    invalid = signed(ready_contribution("invalid", d[1], "t2"), "SignatureInvalid")
    unknown = signed(ready_contribution("unknown", d[2], "t3"), "UnknownSigner")
    revoked = signed(ready_contribution("revoked", d[3], "t4"), "Verified", "k0")
    plain = ready_contribution("plain", d[4], "t5")
    every = [good, invalid, unknown, revoked, plain]
    trust = {"h": frozenset({"k1"})}
    inputs, candidates = composite.evaluate_inputs(
        comp(requireSignatures=True), every, BASE.digest, trust
    )
    reasons = {i["name"]: i["reason"] for i in inputs}
    assert reasons == {
        "good": InputReason.QUEUED,
        "invalid": InputReason.SIGNATURE_INVALID,
        "unknown": InputReason.UNKNOWN_SIGNER,
        "revoked": InputReason.UNKNOWN_SIGNER,  # Verified when it trained, revoked since
        "plain": InputReason.UNSIGNED,
    }
    assert [c["metadata"]["name"] for c in candidates] == ["good"]
    # Without trust read this round (no Institution at all) nothing signed counts.
    _, none = composite.evaluate_inputs(comp(requireSignatures=True), every, BASE.digest)
    assert none == []
    # A composite that does not require signatures takes them all.
    _, all_ = composite.evaluate_inputs(comp(), every, BASE.digest, trust)
    assert len(all_) == 5


def test_only_the_training_job_mounts_the_key_and_may_upload_a_signature() -> None:
    from tests.builders import lorac

    ref = {"keySecretRef": {"name": "hospital-key"}}
    obj = lorac(signing=ref)
    pod = contribution.training_job(obj, SETTINGS, BASE)["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["signing-key"]["secret"]["secretName"] == "hospital-key"
    assert vols["signing-key"]["secret"]["items"] == [{"key": "private.pem", "path": "private.pem"}]
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["signing-key"]["readOnly"] is True
    assert not any("signing" in json.dumps(e) for e in pod["containers"][0].get("env", []))
    plan = contribution.train_plan(obj, BASE, contribution.output_prefix("forge", obj, 1))
    assert plan["signing"]["keyFile"].endswith("/private.pem")
    assert at.SIGNATURE_FILE in plan["output"]["files"]
    grant = signing.training_grant("forge", obj, BASE.uri, BASE.files)
    assert any(k.endswith("/" + at.SIGNATURE_FILE) for k in grant.puts)
    unsigned_obj = lorac()
    unsigned_pod = contribution.training_job(unsigned_obj, SETTINGS, BASE)["spec"]["template"]
    assert "signing-key" not in json.dumps(unsigned_pod)
    unsigned_grant = signing.training_grant("forge", unsigned_obj, BASE.uri, BASE.files)
    assert not any(k.endswith(at.SIGNATURE_FILE) for k in unsigned_grant.puts)
    # An evaluation Job in the same namespace never gets a key, whatever its set says.
    eset = evs()
    eset["spec"]["signing"] = ref
    ejob = evaluation.job(eset, served_composite(), 4, SETTINGS, BASE)
    assert "signing-key" not in json.dumps(ejob)


def test_a_merge_job_mounts_the_forge_key_only_when_the_composite_signs() -> None:
    ref = {"keySecretRef": {"name": "forge-key", "key": "ec.pem"}}
    obj = comp(signing=ref)
    plan = composite.Plan(1, [], [])
    job_plan = mergejob.merge_plan(
        obj, plan, BASE, mergejob.output_prefix("forge", obj, 1), "forge"
    )
    job = mergejob.merge_job(obj, plan, SETTINGS, job_plan)
    vols = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert vols["signing-key"]["secret"]["items"] == [{"key": "ec.pem", "path": "private.pem"}]
    assert job_plan["signing"]["keyFile"].endswith("/private.pem")
    assert at.SIGNATURE_FILE in job_plan["output"]["files"]
    grant = mergejob.merge_grant("forge", obj, plan, BASE)
    assert any(k.endswith("/" + at.SIGNATURE_FILE) for k in grant.puts)
    bare = comp()
    bare_plan = mergejob.merge_plan(bare, plan, BASE, mergejob.output_prefix("forge", bare, 1), "f")
    assert "signing" not in bare_plan
    assert "signing-key" not in json.dumps(mergejob.merge_job(bare, plan, SETTINGS, bare_plan))


def test_push_refuses_a_signing_key_that_is_not_ec_before_uploading(tmp_path: Any) -> None:
    import argparse

    from medforge_cli import models
    from medforge_cli.errors import CliError

    key = tmp_path / "rsa.pem"
    key.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    args = argparse.Namespace(sign_key=str(key), name="clip")
    with pytest.raises(CliError) as err:
        models._sign(args, None, "base-models/clip/", [], b"{}")  # type: ignore[arg-type]
    assert err.value.code == 2 and "--sign-key" in str(err.value) and "elliptic" in str(err.value)
    args.sign_key = str(tmp_path / "absent.pem")
    with pytest.raises(CliError, match=r"absent\.pem"):
        models._sign(args, None, "base-models/clip/", [], b"{}")  # type: ignore[arg-type]


class Store:
    """The verified copies, by key."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects

    def read(self, uri: Any, limit: int = 0) -> bytes:
        from medforge_operator.store import ObjectMissing

        if uri.key not in self.objects:
            raise ObjectMissing(uri, f"{uri} does not exist")
        return self.objects[uri.key]


class Kube:
    def __init__(self) -> None:
        self.patches: list[tuple[str, str, str, JSON]] = []

    def patch_status(self, plural: str, ns: str, name: str, body: JSON) -> None:
        self.patches.append((plural, ns, name, body))


def test_an_unknown_signer_is_judged_again_once_its_key_is_registered() -> None:
    private, public = pem_pair()
    files = {"adapter.safetensors": b"\x05" * 32}
    _, raw = manifest_of(files)
    prefix = "verified/contributions/h/lung/u1/abc/"
    store = Store(
        {prefix + MANIFEST_FILE: raw, prefix + at.SIGNATURE_FILE: bundle(files, raw, private)}
    )
    artifact: JSON = {
        "uri": f"s3://forge/{prefix}",
        "digest": digest_of(raw),
        "signature": {"state": "UnknownSigner", "message": "not an active key"},
    }
    obj = {"metadata": {"namespace": "h", "name": "lung"}, "status": {"artifact": artifact}}
    kube = Kube()
    assert not signatures.recheck(obj, kube, store, [], "h")  # type: ignore[arg-type]
    assert kube.patches == []  # still unknown: nothing written
    keys = [at.TrustedKey(at.key_id(public), public, "hospital-h", "h")]
    assert signatures.recheck(obj, kube, store, keys, "h")  # type: ignore[arg-type]
    plural, ns, name, body = kube.patches[0]
    sig: JSON = body["artifact"]["signature"]
    assert (plural, ns, name) == ("loracontributions", "h", "lung")
    assert sig["state"] == "Verified" and sig["institution"] == "hospital-h"
    assert sig["message"] is None  # the old verdict's message goes (a merge patch)
    # A verdict other than UnknownSigner is never revisited (Invalid stays Invalid).
    artifact["signature"] = {"state": "SignatureInvalid"}
    assert not signatures.recheck(obj, Kube(), store, keys, "h")  # type: ignore[arg-type]
