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
