"""Signatures: which institution's key made an artifact, checked offline.

Every signature is a Sigstore bundle holding a DSSE envelope around an in-toto statement, the
OpenSSF model-signing format. A hospital's trainer signs its output folder with the
`model-signing` library (predicate type MODEL_PREDICATE: every file's sha256); the forge signs
each revision with a statement of its own (REVISION_PREDICATE: the files too, and what the
revision was made of). Verification never needs the folder: the statement's file digests are
compared with digests the verifier computed itself, and the envelope's signature with the
public keys the platform registered (Institutions). Unlike the rest of this package it needs
`cryptography` (every part that imports it lists it)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

JSON = dict[str, Any]
SIGNATURE_FILE = "signature.sigstore.json"  # beside the files it signs, never listed in them
MAX_SIGNATURE_BYTES = 64 << 10  # a contribution's or a base model's bundle
MAX_REVISION_SIGNATURE_BYTES = 4 << 20  # a revision's embeds its inputs' bundles
BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
MODEL_PREDICATE = "https://model_signing/signature/v1.0"
REVISION_PREDICATE = "https://medforge.io/attestation/revision"
REVISION_PREDICATE_VERSION = 1  # grows with later features; readers refuse newer ones
_HASHES: dict[int, type[hashes.SHA256 | hashes.SHA384 | hashes.SHA512]] = {
    256: hashes.SHA256,
    384: hashes.SHA384,
    521: hashes.SHA512,
}


VERIFIED = "Verified"  # the verdict on a signature that holds (status ...signature.state)


class Reason:
    """Why a signature does not count (status reasons and composite input reasons)."""

    UNSIGNED = "Unsigned"
    INVALID = "SignatureInvalid"
    UNKNOWN_SIGNER = "UnknownSigner"


class SignatureProblem(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class BadKey(ValueError):
    """A public or private key that is not a usable EC key (the message says why)."""


@dataclass(frozen=True)
class TrustedKey:
    key_id: str  # sha256 of the key's SubjectPublicKeyInfo PEM, as the bundle's hint
    pem: bytes
    institution: str  # the Institution that registered it
    namespace: str  # the namespace it signs for


@dataclass(frozen=True)
class Signed:
    statement: JSON
    key: TrustedKey


def _public_key(pem: bytes | str) -> ec.EllipticCurvePublicKey:
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise BadKey(f"not a PEM public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.key_size not in _HASHES:
        raise BadKey("not an elliptic-curve key on P-256, P-384 or P-521")
    return key


def key_id(pem: bytes | str) -> str:
    """The key's id: sha256 of its SubjectPublicKeyInfo PEM (model-signing's hint)."""
    spki = _public_key(pem).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def curve(pem: bytes | str) -> str:
    return {256: "P-256", 384: "P-384", 521: "P-521"}[_public_key(pem).curve.key_size]


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what the signature covers."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def root_digest(files: Mapping[str, str]) -> str:
    """sha256 over the files' digests in name order (model-signing's subject digest)."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(bytes.fromhex(files[name]))
    return h.hexdigest()


# How model-signing describes a folder hashed file by file (its verifier checks this block).
FILE_SERIALIZATION: JSON = {
    "serialization": {
        "method": "files",
        "hash_type": "sha256",
        "allow_symlinks": False,
        "ignore_paths": [],
    }
}


def statement(subject: str, files: Mapping[str, str], predicate_type: str, extra: JSON) -> JSON:
    """An in-toto statement over `files` (name -> sha256 hex), in model-signing's layout."""
    resources = [{"name": n, "algorithm": "sha256", "digest": files[n]} for n in sorted(files)]
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": subject, "digest": {"sha256": root_digest(files)}}],
        "predicateType": predicate_type,
        "predicate": {**extra, "resources": resources},
    }


def _private_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, None)
    except (ValueError, TypeError) as exc:
        raise BadKey(f"not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.key_size not in _HASHES:
        raise BadKey("not an elliptic-curve private key on P-256, P-384 or P-521")
    return key


def new_key_pair(bits: int = 256) -> tuple[bytes, bytes]:
    """A fresh EC key pair as PEM (private PKCS#8 unencrypted, public SPKI): for tests, demos
    and a first key; a hospital's production key belongs in its own key management."""
    curves: dict[int, ec.EllipticCurve] = {256: ec.SECP256R1(), 384: ec.SECP384R1()}
    key = ec.generate_private_key(curves[bits])
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return private, public_pem(private)


def public_pem(private_pem: bytes) -> bytes:
    """The PEM public half of a PEM private key (BadKey when it is not a usable EC key)."""
    return (
        _private_key(private_pem)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def private_key_id(pem: bytes) -> str:
    """The id of the public half of a PEM private key."""
    return key_id(public_pem(pem))


def sign_statement(stmt: JSON, private_pem: bytes) -> bytes:
    """A Sigstore bundle over `stmt`, signed with an EC private key (PEM, unencrypted)."""
    key = _private_key(private_pem)
    payload = json.dumps(stmt, sort_keys=True, separators=(",", ":")).encode()
    sig = key.sign(pae(PAYLOAD_TYPE, payload), ec.ECDSA(_HASHES[key.curve.key_size]()))
    spki = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    bundle = {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {
            "publicKey": {"hint": hashlib.sha256(spki).hexdigest()},
            "tlogEntries": [],
        },
        "dsseEnvelope": {
            "payload": base64.b64encode(payload).decode(),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [{"sig": base64.b64encode(sig).decode(), "keyid": ""}],
        },
    }
    return json.dumps(bundle, indent=1).encode()


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise SignatureProblem(Reason.INVALID, f"{what} is missing")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureProblem(Reason.INVALID, f"{what} is not base64") from None


def _envelope(raw: bytes) -> tuple[JSON, str]:
    """The bundle's DSSE envelope and key hint ('' when it names none)."""
    try:
        bundle = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise SignatureProblem(Reason.INVALID, "the signature is not a JSON bundle") from None
    if not isinstance(bundle, dict) or not str(bundle.get("mediaType", "")).startswith(
        "application/vnd.dev.sigstore.bundle"
    ):
        raise SignatureProblem(Reason.INVALID, "the signature is not a Sigstore bundle")
    env = bundle.get("dsseEnvelope")
    if not isinstance(env, dict) or env.get("payloadType") != PAYLOAD_TYPE:
        raise SignatureProblem(Reason.INVALID, "the bundle holds no in-toto DSSE envelope")
    material = bundle.get("verificationMaterial")
    hint = ((material or {}).get("publicKey") or {}) if isinstance(material, dict) else {}
    return env, str(hint.get("hint", "")) if isinstance(hint, dict) else ""


def open_bundle(raw: bytes, keys: Iterable[TrustedKey], who: str) -> Signed:
    """The statement a bundle signs, once its signature checks against one of `keys` (the
    signer's active keys); `who` names the expected signer in messages."""
    env, hint = _envelope(raw)
    payload = _b64(env.get("payload"), "the envelope's payload")
    sigs = env.get("signatures")
    if not isinstance(sigs, list) or len(sigs) != 1 or not isinstance(sigs[0], dict):
        raise SignatureProblem(Reason.INVALID, "the envelope must hold exactly one signature")
    sig = _b64(sigs[0].get("sig"), "the signature")
    candidates = [k for k in keys if not hint or k.key_id == hint]
    if not candidates:
        raise SignatureProblem(
            Reason.UNKNOWN_SIGNER,
            f"signed with key {hint[:16] or '(unnamed)'}, which is not an active key of {who}",
        )
    signed_by = None
    for k in candidates:
        public = _public_key(k.pem)
        try:
            public.verify(
                sig, pae(PAYLOAD_TYPE, payload), ec.ECDSA(_HASHES[public.curve.key_size]())
            )
        except InvalidSignature:
            continue
        signed_by = k
        break
    if signed_by is None:
        raise SignatureProblem(
            Reason.INVALID if hint else Reason.UNKNOWN_SIGNER,
            f"the signature does not verify with {who}'s key" + (f" {hint[:16]}" if hint else "s"),
        )
    try:
        stmt = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise SignatureProblem(Reason.INVALID, "the signed statement is not JSON") from None
    if not isinstance(stmt, dict) or stmt.get("_type") != STATEMENT_TYPE:
        raise SignatureProblem(Reason.INVALID, "the signed payload is not an in-toto statement")
    return Signed(stmt, signed_by)


def file_digests(stmt: JSON) -> dict[str, str]:
    """name -> sha256 hex of every file a statement lists, after checking its subject's digest
    covers exactly them."""
    pred = stmt.get("predicate")
    resources = pred.get("resources") if isinstance(pred, dict) else None
    if not isinstance(resources, list):
        raise SignatureProblem(Reason.INVALID, "the statement lists no files")
    files: dict[str, str] = {}
    for r in resources:
        ok = isinstance(r, dict) and r.get("algorithm") == "sha256"
        name, digest = (r.get("name"), r.get("digest")) if ok else (None, None)
        if not (isinstance(name, str) and isinstance(digest, str) and len(digest) == 64):
            raise SignatureProblem(Reason.INVALID, "the statement lists a file without a sha256")
        if name in files:
            raise SignatureProblem(Reason.INVALID, f"the statement lists {name} twice")
        files[name] = digest.lower()
    subject = stmt.get("subject")
    root = None
    if isinstance(subject, list) and len(subject) == 1 and isinstance(subject[0], dict):
        root = (subject[0].get("digest") or {}).get("sha256")
    try:
        expected = root_digest(files)
    except ValueError:
        raise SignatureProblem(Reason.INVALID, "the statement's digests are not hex") from None
    if root != expected:
        raise SignatureProblem(
            Reason.INVALID, "the statement's subject digest does not cover its files"
        )
    return files


def check_files(stmt: JSON, actual: Mapping[str, str]) -> None:
    """The statement signs exactly these files (name -> sha256 hex the caller computed)."""
    signed = file_digests(stmt)
    for name in sorted(set(signed) | set(actual)):
        if name not in actual:
            raise SignatureProblem(Reason.INVALID, f"the signature lists {name}, which is absent")
        if name not in signed:
            raise SignatureProblem(Reason.INVALID, f"{name} is not covered by the signature")
        if signed[name] != actual[name]:
            raise SignatureProblem(
                Reason.INVALID,
                f"{name}: sha256 {actual[name][:12]}... is not the signed {signed[name][:12]}...",
            )


def sign_folder(folder: Path, private_key: Path, out: Path) -> None:
    """Sign every file in `folder` with the model-signing library (EC key, file by file)."""
    import model_signing  # the trainer's and the CLI's only: the operator never signs

    hashing = model_signing.hashing.Config().use_file_serialization()  # type: ignore[no-untyped-call]
    try:
        model_signing.signing.Config().use_elliptic_key_signer(  # type: ignore[no-untyped-call]
            private_key=private_key
        ).set_hashing_config(hashing).sign(folder, out)
    except (ValueError, TypeError) as exc:
        raise BadKey(f"{private_key.name}: not an unencrypted EC private key ({exc})") from None
