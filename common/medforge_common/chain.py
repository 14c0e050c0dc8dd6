"""The chain of custody of a revision, checked offline from the files a user pulled and a trust
file: the forge's signature over the revision's statement, every file's sha256 against it,
the manifest's inputs against the statement's, and each input's own signature (embedded in
the forge's statement) against the keys of the institution that works in its namespace. The
trust root is the trust file alone (`medforge institution export`); nothing is fetched."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medforge_common.artifacts import MANIFEST_FILE
from medforge_common.attestation import (
    MAX_REVISION_SIGNATURE_BYTES,
    MODEL_PREDICATE,
    REVISION_PREDICATE,
    SIGNATURE_FILE,
    BadKey,
    SignatureProblem,
    TrustedKey,
    check_files,
    file_digests,
    key_id,
    open_bundle,
)

JSON = dict[str, Any]
TRUST_KIND = "MedForgeTrust"
TRUST_VERSION = 1
# Files a pull writes beside the revision's own: never part of what was signed.
LOCAL_FILES = frozenset({SIGNATURE_FILE, "medforge-export.json"})


class ChainBroken(Exception):
    """The first link that does not hold: `link` names it (for a person and for scripts)."""

    def __init__(self, link: str, message: str) -> None:
        super().__init__(f"{link}: {message}")
        self.link = link


@dataclass(frozen=True)
class Trust:
    """Who signs for which namespace, as the trust file says."""

    keys: tuple[TrustedKey, ...]
    names: dict[str, str] = field(default_factory=dict)  # namespace -> display name
    models: dict[str, TrustedKey] = field(default_factory=dict)  # BaseModel -> spec.publicKey

    def for_namespace(self, namespace: str) -> list[TrustedKey]:
        return [k for k in self.keys if k.namespace == namespace]


def trust_document(institutions: Iterable[JSON], at: str, models: Iterable[JSON] = ()) -> JSON:
    """The trust file for these Institution objects: every key with its state (Revoked keys
    are listed so that a reader sees them, and never trusted); and the BaseModels that name
    the key that signed them (spec.publicKey)."""
    out: list[JSON] = []
    for inst in sorted(institutions, key=lambda i: str(i["metadata"]["name"])):
        spec = inst.get("spec") or {}
        keys = []
        for k in spec.get("keys") or []:
            pem = str(k.get("publicKey", ""))
            try:
                kid = key_id(pem)
            except BadKey:
                continue  # an unusable key verifies nothing: left out
            keys.append(
                {"name": k.get("name"), "keyId": kid, "state": k.get("state") or "Active"}
                | {"publicKey": pem}
            )
        out.append(
            {
                "name": inst["metadata"]["name"],
                "namespace": spec.get("namespace", ""),
                "displayName": spec.get("displayName", ""),
                "keys": keys,
            }
        )
    signed = [
        {"name": m["metadata"]["name"], "publicKey": m["spec"]["publicKey"]}
        | {"digest": (m.get("status") or {}).get("digest", "")}
        for m in sorted(models, key=lambda m: str(m["metadata"]["name"]))
        if (m.get("spec") or {}).get("publicKey")
    ]
    return {
        "kind": TRUST_KIND,
        "version": TRUST_VERSION,
        "exportedAt": at,
        "institutions": out,
        "baseModels": signed,
    }


def load_trust(raw: bytes, source: str) -> Trust:
    """A trust file, checked: every Active key parses and has the id it claims."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ChainBroken("trust file", f"{source} is not JSON") from None
    return trust_of(doc, source)


def trust_of(doc: Any, source: str) -> Trust:
    """A trust document (parsed, or as `trust_document` made it), checked the same way."""
    if not isinstance(doc, dict) or doc.get("kind") != TRUST_KIND:
        raise ChainBroken("trust file", f"{source} is not a {TRUST_KIND} document")
    if doc.get("version") != TRUST_VERSION:
        raise ChainBroken("trust file", f"{source}: version {doc.get('version')!r} is unknown")
    keys: list[TrustedKey] = []
    names: dict[str, str] = {}
    for i, inst in enumerate(doc.get("institutions") or []):
        ns, name = str(inst.get("namespace", "")), str(inst.get("name", ""))
        names[ns] = str(inst.get("displayName") or name)
        for k in inst.get("keys") or []:
            if k.get("state", "Active") != "Active":
                continue
            pem = str(k.get("publicKey", "")).encode()
            try:
                kid = key_id(pem)
            except BadKey as exc:
                what = f"institutions[{i}] key {k.get('name')}"
                raise ChainBroken("trust file", f"{what}: {exc}") from None
            if k.get("keyId") not in (None, kid):
                raise ChainBroken("trust file", f"institutions[{i}] key {k.get('name')}: wrong id")
            keys.append(TrustedKey(kid, pem, name, ns))
    models: dict[str, TrustedKey] = {}
    for m in doc.get("baseModels") or []:
        try:
            pem = str(m.get("publicKey", "")).encode()
            models[str(m.get("name"))] = TrustedKey(key_id(pem), pem, str(m.get("name")), "")
        except BadKey as exc:
            raise ChainBroken("trust file", f"baseModels {m.get('name')}: {exc}") from None
    return Trust(tuple(keys), names, models)


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _check_input(row: JSON, trust: Trust) -> JSON:
    """One input's own signature, as the forge's statement carries it."""
    ns, name = str(row.get("namespace", "")), str(row.get("name", ""))
    link = f"input {ns}/{name}"
    bundle = row.get("signature")
    if not isinstance(bundle, dict):
        raise ChainBroken(link, "it is unsigned (the revision names no signature for it)")
    who = f"{trust.names.get(ns, ns)} (namespace {ns})"
    try:
        signed = open_bundle(json.dumps(bundle).encode(), trust.for_namespace(ns), who)
        if signed.statement.get("predicateType") != MODEL_PREDICATE:
            raise SignatureProblem("SignatureInvalid", "its statement is not a model signature")
        files = file_digests(signed.statement)
    except SignatureProblem as exc:
        raise ChainBroken(link, f"{exc.reason}: {exc}") from None
    digest = str(row.get("digest", "")).removeprefix("sha256:")
    if files.get(MANIFEST_FILE) != digest:
        raise ChainBroken(link, "its signature covers another manifest than the one merged")
    claimed = (row.get("signer") or {}).get("keyId")
    if claimed and claimed != signed.key.key_id:
        raise ChainBroken(link, "the forge names another signer than the one whose key verifies")
    return {
        "input": f"{ns}/{name}",
        "institution": signed.key.institution,
        "keyId": signed.key.key_id,
    }


def verify_revision(
    folder: Path, trust: Trust, namespace: str, allow_unsigned_inputs: bool = False
) -> JSON:
    """Check a pulled revision (raw files) of a composite in `namespace`; a report of what
    holds, or ChainBroken at the first link that does not."""
    sig_path = folder / SIGNATURE_FILE
    if not sig_path.is_file():
        raise ChainBroken("revision signature", f"{sig_path} is missing (the forge signs none?)")
    if sig_path.stat().st_size > MAX_REVISION_SIGNATURE_BYTES:
        raise ChainBroken("revision signature", f"{sig_path} is too large")
    who = f"the forge ({trust.names.get(namespace, namespace)}, namespace {namespace})"
    try:
        signed = open_bundle(sig_path.read_bytes(), trust.for_namespace(namespace), who)
        if signed.statement.get("predicateType") != REVISION_PREDICATE:
            raise SignatureProblem("SignatureInvalid", "the statement is not a revision's")
        actual = {
            p.name: _sha256(p)
            for p in sorted(folder.iterdir())
            if p.is_file() and p.name not in LOCAL_FILES
        }
        check_files(signed.statement, actual)
    except SignatureProblem as exc:
        raise ChainBroken("revision signature", f"{exc.reason}: {exc}") from None
    pred = signed.statement.get("predicate") or {}
    rows = [r for r in pred.get("inputs") or [] if isinstance(r, dict)]
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    merged = {str(i.get("digest")) for i in (manifest.get("meta") or {}).get("inputs") or []}
    if merged != {str(r.get("digest")) for r in rows}:
        raise ChainBroken("revision inputs", "the manifest and the signed statement disagree")
    inputs = []
    for row in rows:
        if allow_unsigned_inputs and not isinstance(row.get("signature"), dict):
            inputs.append({"input": f"{row.get('namespace')}/{row.get('name')}", "unsigned": True})
            continue
        inputs.append(_check_input(row, trust))
    return {
        "revision": pred.get("composite"),
        "signer": {"institution": signed.key.institution, "keyId": signed.key.key_id},
        "files": len(actual),
        "inputs": inputs,
        "strategy": pred.get("strategy"),
        "parent": pred.get("parent"),  # incremental: verify that revision too
    }


def verify_model(folder: Path, key: TrustedKey, name: str) -> JSON:
    """Check a base model's folder (its files, manifest.json and signature.sigstore.json)
    against the key that signed it; every file is hashed here."""
    sig_path = folder / SIGNATURE_FILE
    if not sig_path.is_file():
        raise ChainBroken("model signature", f"{sig_path} is missing (pushed without --sign-key?)")
    try:
        signed = open_bundle(sig_path.read_bytes(), [key], f"BaseModel {name}'s key")
        if signed.statement.get("predicateType") != MODEL_PREDICATE:
            raise SignatureProblem("SignatureInvalid", "the statement is not a model signature")
        actual = {
            p.relative_to(folder).as_posix(): _sha256(p)
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in LOCAL_FILES and not p.name.startswith(".")
        }
        check_files(signed.statement, actual)
    except SignatureProblem as exc:
        raise ChainBroken("model signature", f"{exc.reason}: {exc}") from None
    return {"model": name, "keyId": key.key_id, "files": len(actual)}
