"""The shared contract: storage URIs, the artifact manifest and Job results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medforge_common import manifest as mf
from medforge_common.result import (
    MAX_BYTES,
    ResultTooLarge,
    encode_result,
    failure_line,
    read_result,
)
from medforge_common.uris import PvcUri, S3Uri, UriError, parse_uri


def test_parse_uris() -> None:
    assert parse_uri("s3://forge/contributions/a/") == S3Uri("forge", "contributions/a/")
    assert parse_uri("pvc://data-claim/images/train") == PvcUri("data-claim", "images/train")
    assert str(S3Uri("forge", "models").join("clip", "v1")) == "s3://forge/models/clip/v1"


@pytest.mark.parametrize(
    ("uri", "words"),
    [
        ("forge/data", "no scheme"),
        ("http://x/y", "unsupported scheme 'http'"),
        ("s3://UPPER/x", "not a valid S3 bucket name"),
        ("s3://forge/a/../b", "'..' is not allowed"),
        ("pvc://claim//abs", "must be relative"),
    ],
)
def test_bad_uris_name_the_field(uri: str, words: str) -> None:
    with pytest.raises(UriError) as err:
        parse_uri(uri, field="spec.dataset.uri")
    assert str(err.value).startswith("spec.dataset.uri: ") and words in str(err.value)


def test_manifest_round_trip_and_verification(tmp_path: Path) -> None:
    weights = tmp_path / "adapter.safetensors"
    weights.write_bytes(b"\x00" * 1000)
    m = mf.Manifest("contribution", "sha256:base", meta={"rank": 16})
    entry = m.add_file(weights)
    assert entry.size == 1000
    loaded = mf.Manifest.from_json(m.to_json())
    assert loaded == m and loaded.digest() == m.digest()
    mf.verify_dir(tmp_path, loaded)

    weights.write_bytes(b"\x01" * 1000)  # same size, other bytes
    with pytest.raises(mf.ManifestError, match=r"adapter.safetensors: sha256 .* differs"):
        mf.verify_dir(tmp_path, loaded)
    weights.unlink()
    with pytest.raises(mf.ManifestError, match="missing"):
        mf.verify_dir(tmp_path, loaded)


@pytest.mark.parametrize("name", ["adapter.bin", "model.PT", "weights.pkl", "x.ckpt"])
def test_pickle_files_are_refused_with_the_reason(name: str) -> None:
    doc = {
        "schema_version": 1,
        "kind": "contribution",
        "base_model_digest": "d",
        "files": [{"name": name, "sha256": "0" * 64, "size": 1}],
    }
    with pytest.raises(mf.ManifestError) as err:
        mf.Manifest.from_json(json.dumps(doc))
    assert name in str(err.value) and "safetensors" in str(err.value)


def test_manifest_errors_name_the_problem() -> None:
    with pytest.raises(mf.ManifestError, match="not valid JSON"):
        mf.Manifest.from_json("{", "s3://forge/x/manifest.json")
    with pytest.raises(mf.ManifestError, match="'files' is missing"):
        mf.Manifest.from_json(
            json.dumps({"schema_version": 1, "kind": "k", "base_model_digest": "d"})
        )
    with pytest.raises(mf.ManifestError, match="schema_version 9"):
        mf.Manifest.from_json(json.dumps({"schema_version": 9}))


def test_results_fit_a_termination_message() -> None:
    ok = {"artifact": {"uri": "s3://forge/a/", "digest": "sha256:x"}, "metrics": {"accuracy": 0.9}}
    assert read_result(encode_result(ok)) == ok
    with pytest.raises(ResultTooLarge):
        encode_result({"x": "y" * MAX_BYTES})
    line = failure_line("class mismatch:\n folder 'tumour' is not in spec.task.classes")
    assert "\n" not in line and read_result(line) is None
    assert len(failure_line("x" * 10_000).encode()) < MAX_BYTES
