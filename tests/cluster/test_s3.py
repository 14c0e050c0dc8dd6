"""The S3 server is real: it enforces credentials and serves presigned URLs over HTTP."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request

import pytest
from botocore.exceptions import ClientError

from medforge_localcluster.s3 import client
from tests.conftest import Bucket


def test_wrong_secret_key_is_refused(s3_bucket: Bucket) -> None:
    intruder = client(s3_bucket.endpoint, s3_bucket.access_key, "not-the-secret")
    with pytest.raises(ClientError) as err:
        intruder.list_objects_v2(Bucket=s3_bucket.name)
    assert err.value.response["Error"]["Code"] in ("SignatureDoesNotMatch", "AccessDenied")
    unknown = client(s3_bucket.endpoint, "nobody", s3_bucket.secret_key)
    with pytest.raises(ClientError):
        unknown.put_object(Bucket=s3_bucket.name, Key="x", Body=b"x")
    # Nothing was written by either.
    assert s3_bucket.client.list_objects_v2(Bucket=s3_bucket.name).get("KeyCount", 0) == 0


def test_presigned_put_then_get_round_trips(s3_bucket: Bucket) -> None:
    payload = os.urandom(300_000)
    key = "contributions/hospital-a/adapter/1/adapter.safetensors"
    put_url = s3_bucket.client.generate_presigned_url(
        "put_object", Params={"Bucket": s3_bucket.name, "Key": key}, ExpiresIn=300
    )
    req = urllib.request.Request(put_url, data=payload, method="PUT")
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200

    get_url = s3_bucket.client.generate_presigned_url(
        "get_object", Params={"Bucket": s3_bucket.name, "Key": key}, ExpiresIn=300
    )
    with urllib.request.urlopen(get_url, timeout=30) as resp:
        body = resp.read()
    assert hashlib.sha256(body).digest() == hashlib.sha256(payload).digest()

    # A tampered signature is refused: the URL, not the network, carries the authority.
    tampered = get_url.replace("X-Amz-Signature=", "X-Amz-Signature=0")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(tampered, timeout=30)
    assert err.value.code == 403


def test_erasure_deletes_every_version_under_a_prefix_and_nothing_beside_it(
    s3_bucket: Bucket,
) -> None:
    """A withdrawn hospital's folder in a bucket that keeps versions: older versions and delete
    markers go too; a neighbour whose name starts the same stays."""
    from medforge_common.uris import S3Uri
    from medforge_operator.settings import Settings
    from medforge_operator.store import ForgeStore

    s3 = s3_bucket.client
    s3.put_bucket_versioning(Bucket=s3_bucket.name, VersioningConfiguration={"Status": "Enabled"})
    for body in (b"v1", b"v2", b"v3"):
        s3.put_object(Bucket=s3_bucket.name, Key="contributions/h/b/u/1/adapter.bin", Body=body)
    s3.put_object(Bucket=s3_bucket.name, Key="contributions/h/b/u/1/manifest.json", Body=b"m")
    s3.delete_object(Bucket=s3_bucket.name, Key="contributions/h/b/u/1/manifest.json")
    s3.put_object(Bucket=s3_bucket.name, Key="contributions/h/bb/u/1/adapter.bin", Body=b"keep")
    listed = s3.list_object_versions(Bucket=s3_bucket.name, Prefix="contributions/h/b/")
    assert len(listed.get("Versions", [])) >= 4 and listed.get("DeleteMarkers")
    store = ForgeStore(
        Settings(s3_bucket.endpoint, s3_bucket.name, s3_bucket.access_key, s3_bucket.secret_key)
    )
    deleted = store.erase(S3Uri(s3_bucket.name, "contributions/h/b/"))
    assert deleted == [
        "contributions/h/b/u/1/adapter.bin",
        "contributions/h/b/u/1/manifest.json",
    ]
    left = s3.list_object_versions(Bucket=s3_bucket.name, Prefix="contributions/h/")
    keys = {v["Key"] for v in [*left.get("Versions", []), *left.get("DeleteMarkers", [])]}
    assert keys == {"contributions/h/bb/u/1/adapter.bin"}
    with pytest.raises(ValueError, match="not an artifact's folder"):
        store.erase(S3Uri(s3_bucket.name, "contributions/"))
    # The fixture's cleanup deletes current objects only: leave no version behind.
    store.erase(S3Uri(s3_bucket.name, "contributions/h/bb/"))
