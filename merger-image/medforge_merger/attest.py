"""The forge's signature over a revision (spec.signing): an in-toto statement whose predicate
(medforge's revision predicate, versioned) names what went into it: every input with its
manifest digest, its signer as the operator verified it and that signer's own bundle, the
strategy as written and the coefficients, the gate's figures, the inputs' privacy grants and
the parent revision. Its resources list every file of the revision, manifest.json included,
so one bundle checks the files, the inputs and their signatures offline."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from medforge_common.attestation import (
    MAX_SIGNATURE_BYTES,
    REVISION_PREDICATE,
    REVISION_PREDICATE_VERSION,
    SIGNATURE_FILE,
    BadKey,
    sign_statement,
    statement,
)
from medforge_merger.config import MergeConfig
from medforge_ml import transfers

JSON = dict[str, Any]


class SigningFailed(Exception):
    """The forge's key is unusable or an input's bundle could not be read."""


def _bundle(item: JSON, work: Path, i: int) -> JSON | None:
    """The input's bundle (the operator's verified copy), parsed, or None when unsigned."""
    sig = item.get("signature")
    if not isinstance(sig, dict) or not ("url" in sig or "path" in sig):
        return None
    path = work / f"input-{i}-{SIGNATURE_FILE}"
    if "url" in sig:
        transfers.download(
            str(sig["url"]), path, f"inputs[{i}].signature", max_bytes=MAX_SIGNATURE_BYTES
        )
    else:
        shutil.copyfile(str(sig["path"]), path)
    try:
        bundle = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise SigningFailed(f"inputs[{i}].signature: not a JSON bundle ({exc})") from None
    return bundle if isinstance(bundle, dict) else None


def predicate(cfg: MergeConfig, result: JSON, work: Path) -> JSON:
    """What the revision is made of, as the merge saw it."""
    by_digest = {str(i["digest"]): (n, i) for n, i in enumerate(cfg.inputs)}
    inputs: list[JSON] = []
    excluded: list[JSON] = []
    for entry in result.get("inputs") or []:
        n, item = by_digest.get(str(entry.get("digest")), (-1, {}))
        row = {k: entry.get(k) for k in ("namespace", "name", "digest")}
        if entry.get("state") != "Included":
            excluded.append(row | {"reason": entry.get("reason", "")})
            continue
        row |= {"coefficient": entry.get("coefficient"), "new": bool(item.get("new", True))}
        if isinstance(item.get("privacy"), dict):
            row["privacy"] = item["privacy"]
        if isinstance(item.get("parent"), dict):  # trained from a revision: added relative to it
            row["parent"] = item["parent"]
        sig = item.get("signature")
        if isinstance(sig, dict):
            row["signer"] = {k: sig.get(k, "") for k in ("institution", "keyId")}
            row["signature"] = _bundle(item, work, n)
        inputs.append(row)
    return {
        "version": REVISION_PREDICATE_VERSION,
        **cfg.record,
        "baseModel": {"digest": cfg.base_digest, "name": cfg.base.get("name", "")},
        "integration": cfg.integration,
        "inputs": inputs,
        "excluded": excluded,
        "gate": {
            "rule": cfg.gate,
            "metrics": result.get("metrics") or {},
            "regression": result.get("regression") or {},
        },
    }


def sign_revision(cfg: MergeConfig, result: JSON, files: list[Path], work: Path) -> Path:
    """The bundle over the revision's `files` (their digests computed here), signed with the
    forge's key; its path."""
    if cfg.signing_key is None:
        raise SigningFailed("the job config names no signing key")
    digests = {}
    for p in files:
        with p.open("rb") as f:
            digests[p.name] = hashlib.file_digest(f, "sha256").hexdigest()
    comp = cfg.record.get("composite") or {}
    subject = f"{comp.get('namespace', '')}/{comp.get('name', '')}/rev-{comp.get('revision', '')}"
    stmt = statement(subject, digests, REVISION_PREDICATE, predicate(cfg, result, work))
    try:
        raw = sign_statement(stmt, Path(cfg.signing_key).read_bytes())
    except (OSError, BadKey) as exc:
        raise SigningFailed(
            f"the forge's key (spec.signing.keySecretRef) is unusable: {exc}"
        ) from None
    out = work / SIGNATURE_FILE
    out.write_bytes(raw)
    return out
