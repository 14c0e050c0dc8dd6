"""The chain of custody offline (medforge_common.chain): a revision the merger's own code signs,
with its inputs' bundles embedded, verifies from the folder and a trust file alone; a tampered
file, a statement re-signed with a swapped input signer, a revoked key, an unsigned input and
a trust file that lies about a key id each break the chain at the link they name."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from medforge_common import attestation as at
from medforge_common import chain
from medforge_common.manifest import FileEntry, Manifest, digest_of
from medforge_merger import attest, config

pytestmark = pytest.mark.unit
JSON = dict[str, Any]
BASE = "sha256:" + "b" * 64


def pair() -> tuple[bytes, bytes]:
    return at.new_key_pair()


def institution(name: str, ns: str, *keys: tuple[str, bytes, str]) -> JSON:
    return {
        "metadata": {"name": name},
        "spec": {
            "namespace": ns,
            "displayName": name.title(),
            "keys": [{"name": n, "publicKey": p.decode(), "state": s} for n, p, s in keys],
        },
    }


def contribution_bundle(private: bytes, adapter: bytes) -> tuple[str, JSON]:
    """(manifest digest, bundle) of a hospital's signed contribution, as the trainer makes it."""
    manifest = Manifest(
        "contribution",
        BASE,
        [FileEntry("adapter.safetensors", hashlib.sha256(adapter).hexdigest(), len(adapter))],
    ).to_json()
    files = {
        "adapter.safetensors": hashlib.sha256(adapter).hexdigest(),
        "manifest.json": hashlib.sha256(manifest.encode()).hexdigest(),
    }
    raw = at.sign_statement(at.statement("out", files, at.MODEL_PREDICATE, {}), private)
    return digest_of(manifest.encode()), json.loads(raw)


class World:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.forge, forge_pub = pair()
        self.a, a_pub = pair()
        self.b, b_pub = pair()
        self.institutions = [
            institution("forge", "forge-ns", ("k", forge_pub, "Active")),
            institution("hospital-a", "hospital-a", ("k", a_pub, "Active")),
            institution("hospital-b", "hospital-b", ("k", b_pub, "Active")),
        ]
        self.a_id, self.b_id = at.key_id(a_pub), at.key_id(b_pub)

    def trust(self) -> chain.Trust:
        doc = chain.trust_document(self.institutions, "t")
        return chain.load_trust(json.dumps(doc).encode(), "trust.json")

    def revision(self, input_key: bytes | None = None, claimed: str | None = None) -> Path:
        """A revision of forge-ns/foundation merging one input of hospital-a, signed with the
        merger's attest module."""
        folder = self.tmp / "rev"
        folder.mkdir(exist_ok=True)
        digest, bundle = contribution_bundle(input_key or self.a, b"\x01" * 256)
        sig_file = self.tmp / "input-sig.json"
        sig_file.write_text(json.dumps(bundle))
        composite = b"\x07" * 512
        (folder / "adapter.safetensors").write_bytes(composite)
        included = {"namespace": "hospital-a", "name": "lung", "digest": digest}
        manifest = Manifest(
            "composite",
            BASE,
            [FileEntry("adapter.safetensors", hashlib.sha256(composite).hexdigest(), 512)],
            {"inputs": [included | {"state": "Included", "coefficient": 1.0}]},
        )
        (folder / "manifest.json").write_text(manifest.to_json())
        key = self.tmp / "forge.pem"
        key.write_bytes(self.forge)
        cfg = config.parse(
            {
                "composite": {"namespace": "forge-ns", "name": "foundation", "revision": 3},
                "baseModel": {"digest": BASE, "files": []},
                "strategy": {"type": "linear"},
                "inputs": [
                    included
                    | {
                        "files": [],
                        "signature": {
                            "institution": "hospital-a",
                            "keyId": claimed or self.a_id,
                            "path": str(sig_file),
                        },
                    }
                ],
                "signing": {"keyFile": str(key)},
            }
        )
        result = {
            "inputs": [included | {"state": "Included", "coefficient": 1.0}],
            "metrics": {"lung": {"accuracy": 0.9}},
        }
        work = self.tmp / "work"
        work.mkdir(exist_ok=True)
        bundle_path = attest.sign_revision(
            cfg, result, [folder / "adapter.safetensors", folder / "manifest.json"], work
        )
        (folder / at.SIGNATURE_FILE).write_bytes(bundle_path.read_bytes())
        return folder


def test_a_signed_revision_verifies_offline_and_names_its_signers(tmp_path: Path) -> None:
    w = World(tmp_path)
    folder = w.revision()
    report = chain.verify_revision(folder, w.trust(), "forge-ns")
    assert report["signer"]["institution"] == "forge"
    assert report["inputs"] == [
        {"input": "hospital-a/lung", "institution": "hospital-a", "keyId": w.a_id}
    ]
    assert report["revision"] == {"namespace": "forge-ns", "name": "foundation", "revision": 3}
    envelope = json.loads((folder / at.SIGNATURE_FILE).read_text())["dsseEnvelope"]
    stmt = json.loads(base64.b64decode(envelope["payload"]))
    pred = stmt["predicate"]
    assert pred["version"] == at.REVISION_PREDICATE_VERSION and pred["strategy"]["type"] == "linear"
    assert pred["gate"]["metrics"]["lung"]["accuracy"] == 0.9
    assert pred["inputs"][0]["coefficient"] == 1.0
    # The forge's key is trusted for its own namespace only: a hospital cannot be the forge.
    with pytest.raises(chain.ChainBroken) as err:
        chain.verify_revision(folder, w.trust(), "hospital-a")
    assert err.value.link == "revision signature"


def test_a_tampered_file_breaks_the_revision_link(tmp_path: Path) -> None:
    w = World(tmp_path)
    folder = w.revision()
    (folder / "adapter.safetensors").write_bytes(b"\x08" * 512)
    with pytest.raises(chain.ChainBroken) as err:
        chain.verify_revision(folder, w.trust(), "forge-ns")
    assert err.value.link == "revision signature" and "adapter.safetensors" in str(err.value)
    (folder / "extra.bin").write_bytes(b"x")
    with pytest.raises(chain.ChainBroken):
        chain.verify_revision(folder, w.trust(), "forge-ns")


def test_a_statement_resigned_with_a_swapped_input_signer_breaks_at_that_input(
    tmp_path: Path,
) -> None:
    w = World(tmp_path)
    # The forge's key signs, but the input's bundle was made with hospital-b's key while it
    # claims to be hospital-a's contribution.
    folder = w.revision(input_key=w.b, claimed=w.b_id)
    with pytest.raises(chain.ChainBroken) as err:
        chain.verify_revision(folder, w.trust(), "forge-ns")
    assert err.value.link == "input hospital-a/lung" and "UnknownSigner" in str(err.value)


def test_a_revoked_key_and_an_unsigned_input(tmp_path: Path) -> None:
    w = World(tmp_path)
    folder = w.revision()
    w.institutions[1]["spec"]["keys"][0]["state"] = "Revoked"
    with pytest.raises(chain.ChainBroken) as err:
        chain.verify_revision(folder, w.trust(), "forge-ns")
    assert err.value.link == "input hospital-a/lung"
    doc = json.loads((folder / at.SIGNATURE_FILE).read_text())
    assert doc["mediaType"] == at.BUNDLE_MEDIA_TYPE
    (folder / at.SIGNATURE_FILE).unlink()
    with pytest.raises(chain.ChainBroken) as missing:
        chain.verify_revision(folder, w.trust(), "forge-ns")
    assert missing.value.link == "revision signature"


def test_a_trust_file_that_lies_about_a_key_id_is_refused(tmp_path: Path) -> None:
    w = World(tmp_path)
    doc = chain.trust_document(w.institutions, "t")
    doc["institutions"][1]["keys"][0]["keyId"] = "0" * 64
    with pytest.raises(chain.ChainBroken) as err:
        chain.load_trust(json.dumps(doc).encode(), "trust.json")
    assert err.value.link == "trust file"
    with pytest.raises(chain.ChainBroken):
        chain.load_trust(b'{"kind": "Other"}', "trust.json")


def test_an_unsigned_input_breaks_the_chain_unless_allowed(tmp_path: Path) -> None:
    w = World(tmp_path)
    folder = w.revision()
    bundle = json.loads((folder / at.SIGNATURE_FILE).read_bytes())
    stmt = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    for row in stmt["predicate"]["inputs"]:
        row.pop("signature")
        row.pop("signer")
    (folder / at.SIGNATURE_FILE).write_bytes(at.sign_statement(stmt, w.forge))
    with pytest.raises(chain.ChainBroken) as err:
        chain.verify_revision(folder, w.trust(), "forge-ns")
    assert err.value.link == "input hospital-a/lung" and "unsigned" in str(err.value)
    report = chain.verify_revision(folder, w.trust(), "forge-ns", allow_unsigned_inputs=True)
    assert report["inputs"] == [{"input": "hospital-a/lung", "unsigned": True}]
