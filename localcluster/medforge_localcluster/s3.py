"""Small helpers around the local S3 server (versitygw) for set-up, tests and the demo."""

from __future__ import annotations

from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError


def client(endpoint: str, access_key: str, secret_key: str) -> Any:
    """A boto3 S3 client for a path-style, SigV4, loopback endpoint."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name="us-east-1",
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"max_attempts": 3, "mode": "standard"},
        ),
    )


def ensure_bucket(endpoint: str, access_key: str, secret_key: str, bucket: str) -> None:
    s3 = client(endpoint, access_key, secret_key)
    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError:
        s3.create_bucket(Bucket=bucket)
