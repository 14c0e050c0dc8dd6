"""Signatures (medforge_common.attestation): a folder signed by the model-signing library checks
with our verifier and no folder; tampering, another key, a rewritten statement, a forged
subject each fail with their reason; the forge's own statements round-trip."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from medforge_common import attestation as at

pytestmark = pytest.mark.unit


def keypair(tmp: Path, name: str, curve: ec.EllipticCurve | None = None) -> tuple[Path, bytes]:
    private, public = at.new_key_pair(curve.key_size if curve else 256)
    path = tmp / f"{name}.pem"
    path.write_bytes(private)
    return path, public


def trusted(pub: bytes, institution: str = "hospital-a") -> at.TrustedKey:
    return at.TrustedKey(at.key_id(pub), pub, institution, institution)


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


@pytest.fixture
def signed(tmp_path: Path) -> tuple[Path, Path, bytes]:
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "adapter.safetensors").write_bytes(b"\x01" * 4096)
    (folder / "manifest.json").write_text('{"kind": "contribution"}')
    key, pub = keypair(tmp_path, "a")
    sig = tmp_path / at.SIGNATURE_FILE
    at.sign_folder(folder, key, sig)
    return folder, sig, pub


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1()])
def test_model_signing_bundle_checks_without_the_folder(
    tmp_path: Path, curve: ec.EllipticCurve
) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "adapter.safetensors").write_bytes(b"\x02" * 1000)
    key, pub = keypair(tmp_path, "a", curve)
    at.sign_folder(folder, key, tmp_path / "sig.json")
    got = at.open_bundle((tmp_path / "sig.json").read_bytes(), [trusted(pub)], "hospital-a")
    assert got.key.key_id == at.key_id(pub)
    assert got.statement["predicateType"] == at.MODEL_PREDICATE
    at.check_files(got.statement, digests(folder))


def test_the_library_itself_verifies_what_the_forge_signs_with_our_code(
    tmp_path: Path,
) -> None:
    """The forge's bundle is the same format: model-signing's verifier accepts a folder
    statement that our sign_statement made."""
    import model_signing

    folder = tmp_path / "rev"
    folder.mkdir()
    (folder / "adapter.safetensors").write_bytes(b"\x03" * 512)
    key, pub = keypair(tmp_path, "forge")
    stmt = at.statement(
        "rev",
        digests(folder),
        at.MODEL_PREDICATE,
        {"serialization": {"method": "files", "hash_type": "sha256", "allow_symlinks": False,
                           "ignore_paths": []}},
    )  # fmt: skip
    (tmp_path / "sig.json").write_bytes(at.sign_statement(stmt, key.read_bytes()))
    (tmp_path / "pub.pem").write_bytes(pub)
    model_signing.verifying.Config().use_elliptic_key_verifier(  # type: ignore[no-untyped-call]
        public_key=tmp_path / "pub.pem"
    ).set_hashing_config(
        model_signing.hashing.Config()  # type: ignore[no-untyped-call]
        .use_file_serialization()
        .set_ignored_paths(paths=[])
    ).verify(folder, tmp_path / "sig.json")


def test_a_tampered_file_fails_even_with_the_manifest_rewritten(
    signed: tuple[Path, Path, bytes],
) -> None:
    folder, sig, pub = signed
    (folder / "adapter.safetensors").write_bytes(b"\x09" * 4096)
    (folder / "manifest.json").write_text('{"kind": "contribution", "rewritten": true}')
    got = at.open_bundle(sig.read_bytes(), [trusted(pub)], "hospital-a")
    with pytest.raises(at.SignatureProblem) as err:
        at.check_files(got.statement, digests(folder))
    assert err.value.reason == at.Reason.INVALID
    assert "adapter.safetensors" in str(err.value)


def test_a_file_added_or_left_out_fails(signed: tuple[Path, Path, bytes]) -> None:
    folder, sig, pub = signed
    got = at.open_bundle(sig.read_bytes(), [trusted(pub)], "hospital-a")
    files = digests(folder)
    with pytest.raises(at.SignatureProblem, match="not covered"):
        at.check_files(got.statement, {**files, "extra.safetensors": "0" * 64})
    files.pop("manifest.json")
    with pytest.raises(at.SignatureProblem, match="absent"):
        at.check_files(got.statement, files)


def test_another_hospitals_key_is_an_unknown_signer(
    tmp_path: Path, signed: tuple[Path, Path, bytes]
) -> None:
    _, sig, _ = signed
    _, other = keypair(tmp_path, "b")
    with pytest.raises(at.SignatureProblem) as err:
        at.open_bundle(sig.read_bytes(), [trusted(other, "hospital-b")], "Institution hospital-b")
    assert err.value.reason == at.Reason.UNKNOWN_SIGNER
    with pytest.raises(at.SignatureProblem) as err:
        at.open_bundle(sig.read_bytes(), [], "Institution hospital-a")
    assert err.value.reason == at.Reason.UNKNOWN_SIGNER


def test_a_rewritten_statement_or_a_borrowed_hint_fails(
    tmp_path: Path, signed: tuple[Path, Path, bytes]
) -> None:
    _, sig, pub = signed
    bundle = json.loads(sig.read_bytes())
    stmt = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    stmt["predicate"]["resources"][0]["digest"] = "0" * 64
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(stmt).encode()).decode()
    with pytest.raises(at.SignatureProblem) as err:
        at.open_bundle(json.dumps(bundle).encode(), [trusted(pub)], "hospital-a")
    assert err.value.reason == at.Reason.INVALID
    # Signed by another key but naming hospital-a's key as its hint.
    key_b, _ = keypair(tmp_path, "b")
    forged = json.loads(at.sign_statement(stmt, key_b.read_bytes()))
    forged["verificationMaterial"]["publicKey"]["hint"] = at.key_id(pub)
    with pytest.raises(at.SignatureProblem) as err:
        at.open_bundle(json.dumps(forged).encode(), [trusted(pub)], "hospital-a")
    assert err.value.reason == at.Reason.INVALID


def test_a_subject_that_does_not_cover_the_files_fails(tmp_path: Path) -> None:
    key, pub = keypair(tmp_path, "forge")
    stmt = at.statement("rev-1", {"a.safetensors": "1" * 64}, at.REVISION_PREDICATE, {})
    stmt["subject"][0]["digest"]["sha256"] = "2" * 64
    got = at.open_bundle(at.sign_statement(stmt, key.read_bytes()), [trusted(pub)], "forge")
    with pytest.raises(at.SignatureProblem, match="subject digest"):
        at.check_files(got.statement, {"a.safetensors": "1" * 64})


@pytest.mark.parametrize(
    "raw",
    [b"", b"[]", b'{"mediaType": "x"}', b"\xff\xfe",
     json.dumps({"mediaType": at.BUNDLE_MEDIA_TYPE, "dsseEnvelope": {
         "payloadType": at.PAYLOAD_TYPE, "payload": "!!", "signatures": []}}).encode()],
)  # fmt: skip
def test_garbage_is_an_invalid_signature_never_a_crash(raw: bytes, tmp_path: Path) -> None:
    _, pub = keypair(tmp_path, "a")
    with pytest.raises(at.SignatureProblem) as err:
        at.open_bundle(raw, [trusted(pub)], "hospital-a")
    assert err.value.reason == at.Reason.INVALID


def test_keys_other_than_ec_are_refused_by_name(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    pub = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(at.BadKey, match="elliptic-curve"):
        at.key_id(pub)
    with pytest.raises(at.BadKey, match="PEM"):
        at.key_id(b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
