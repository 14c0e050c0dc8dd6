"""Fixtures for the operator's cluster tests: CRDs, a base model in the forge store, and the
operator running as a real process (started and stopped by the tests)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from medforge_common.manifest import FileEntry, Manifest
from medforge_localcluster.s3 import client
from tests.conftest import ClusterAccess

ROOT = Path(__file__).resolve().parents[2]
STANDINS = ROOT / "tests" / "standins"


@pytest.fixture(scope="session")
def crds(cluster: ClusterAccess) -> None:
    cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")


@dataclass(frozen=True)
class Forge:
    bucket: str
    endpoint: str
    access_key: str
    secret_key: str

    def upload_base_model(
        self, name: str, config: bytes = b'{"model_type": "clip"}'
    ) -> tuple[str, str]:
        """A (fake) base model: config.json plus its manifest. Returns (uri, digest)."""
        s3 = client(self.endpoint, self.access_key, self.secret_key)
        manifest = Manifest(
            "base-model",
            "",
            [FileEntry("config.json", hashlib.sha256(config).hexdigest(), len(config))],
        )
        body = manifest.to_json().encode()
        s3.put_object(Bucket=self.bucket, Key=f"models/{name}/config.json", Body=config)
        s3.put_object(Bucket=self.bucket, Key=f"models/{name}/manifest.json", Body=body)
        return f"s3://{self.bucket}/models/{name}/", "sha256:" + hashlib.sha256(body).hexdigest()


@pytest.fixture(scope="session")
def forge(cluster: ClusterAccess) -> Iterator[Forge]:
    s3 = client(cluster.s3_endpoint, cluster.s3_access_key, cluster.s3_secret_key)
    bucket = f"forge-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    yield Forge(bucket, cluster.s3_endpoint, cluster.s3_access_key, cluster.s3_secret_key)


class OperatorProcess:
    def __init__(self, cluster: ClusterAccess, forge: Forge, log: Path, **env: str) -> None:
        self.log = log
        self.env = dict(os.environ)
        self.env.update(
            {
                "KUBECONFIG": str(cluster.kubeconfig),
                "MEDFORGE_STORE_ENDPOINT": forge.endpoint,
                "MEDFORGE_STORE_BUCKET": forge.bucket,
                "MEDFORGE_STORE_ACCESS_KEY_ID": forge.access_key,
                "MEDFORGE_STORE_SECRET_ACCESS_KEY": forge.secret_key,
                "MEDFORGE_TRAINER_COMMAND": json.dumps(
                    ["python", str(STANDINS / "fake_trainer.py")]
                ),
                "MEDFORGE_MERGER_COMMAND": json.dumps(["python", str(STANDINS / "fake_merger.py")]),
                "MEDFORGE_PRESIGN_EXPIRY_SECONDS": "3600",
                "PYTHONUNBUFFERED": "1",
                **env,
            }
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "medforge_operator"],
                stdout=f,
                stderr=subprocess.STDOUT,
                env=self.env,
            )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


@pytest.fixture(scope="session")
def operator(
    cluster: ClusterAccess, crds: None, forge: Forge, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    op = OperatorProcess(cluster, forge, tmp_path_factory.mktemp("operator") / "operator.log")
    op.start()
    time.sleep(1)
    yield op
    op.stop()
