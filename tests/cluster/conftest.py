"""Fixtures for the operator's cluster tests: CRDs, a base model in the forge store, and the
operator running as a real process (started and stopped by the tests)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from medforge_common.manifest import FileEntry, Manifest, digest_of
from medforge_localcluster.s3 import client
from tests.conftest import ClusterAccess

ROOT = Path(__file__).resolve().parents[2]
STANDINS = ROOT / "tests" / "standins"


@pytest.fixture(scope="session")
def crds(cluster: ClusterAccess) -> None:
    cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")


# Forge namespaces are settings of the operator, fixed when it starts: the tests draw fresh ones
# from this pool, never reusing a name in a session (a deleted namespace lingers a while).
FORGE_POOL = tuple(f"medforge-forge-{i}" for i in range(32))
_forge_names = itertools.count()


@pytest.fixture
def forge_namespace(cluster: ClusterAccess) -> Iterator[str]:
    """A fresh forge namespace (member-labelled, among the operator's forge namespaces)."""
    name = FORGE_POOL[next(_forge_names)]
    cluster.kubectl("create", "namespace", name)
    cluster.kubectl("label", "namespace", name, "medforge.io/member=true")
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@dataclass(frozen=True)
class Forge:
    bucket: str
    endpoint: str
    access_key: str
    secret_key: str

    def upload_base_model(
        self, name: str, config: bytes = b'{"model_type": "clip"}'
    ) -> tuple[str, str]:
        """A (fake) base model under base-models/NAME/: config.json plus its manifest. Returns
        (name, digest)."""
        s3 = client(self.endpoint, self.access_key, self.secret_key)
        manifest = Manifest(
            "base-model",
            "",
            [FileEntry("config.json", hashlib.sha256(config).hexdigest(), len(config))],
        )
        body = manifest.to_json().encode()
        s3.put_object(Bucket=self.bucket, Key=f"base-models/{name}/config.json", Body=config)
        s3.put_object(Bucket=self.bucket, Key=f"base-models/{name}/manifest.json", Body=body)
        return name, digest_of(body)

    def upload_model_dir(self, name: str, directory: Path) -> None:
        """A prepared model folder (files plus manifest.json) under base-models/NAME/."""
        s3 = client(self.endpoint, self.access_key, self.secret_key)
        for p in sorted(directory.iterdir()):
            s3.put_object(
                Bucket=self.bucket, Key=f"base-models/{name}/{p.name}", Body=p.read_bytes()
            )


def register_base_model(
    cluster: ClusterAccess, name: str, digest: str | None = None, wait: bool = True, **spec: Any
) -> dict[str, Any]:
    """Register a BaseModel as the platform team does (kubectl apply) and, by default, wait
    until the operator has verified it. Returns its status."""
    doc = {
        "apiVersion": "medforge.io/v1alpha1",
        "kind": "BaseModel",
        "metadata": {"name": name},
        "spec": {**({"digest": digest} if digest else {}), **spec},
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(doc))
    if not wait:
        return {}
    deadline = time.monotonic() + 90
    st: dict[str, Any] = {}
    while time.monotonic() < deadline:
        out = cluster.kubectl("get", "basemodel", name, "-o", "json")
        st = json.loads(out.stdout).get("status") or {}
        if st.get("phase") == "Ready":
            return st
        time.sleep(0.3)
    raise AssertionError(f"BaseModel {name} not Ready: {st}")


def base_model(cluster: ClusterAccess, forge: Forge, name: str, **kw: Any) -> tuple[str, str]:
    """Upload a fake base model and register it; (name, digest)."""
    name, digest = forge.upload_base_model(name, **kw)
    register_base_model(cluster, name, digest)
    return name, digest


@pytest.fixture(scope="session")
def forge(cluster: ClusterAccess) -> Iterator[Forge]:
    s3 = client(cluster.s3_endpoint, cluster.s3_access_key, cluster.s3_secret_key)
    bucket = f"forge-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    yield Forge(bucket, cluster.s3_endpoint, cluster.s3_access_key, cluster.s3_secret_key)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


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
                "MEDFORGE_EVALUATOR_COMMAND": json.dumps(
                    ["python", str(STANDINS / "fake_evaluator.py")]
                ),
                "MEDFORGE_PRESIGN_EXPIRY_SECONDS": "3600",
                "MEDFORGE_FORGE_NAMESPACES": ",".join(FORGE_POOL),
                "PYTHONUNBUFFERED": "1",
                **env,
            }
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.metrics_port = 0  # where it serves /metrics, when it does

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
    port = free_port()
    op = OperatorProcess(
        cluster,
        forge,
        tmp_path_factory.mktemp("operator") / "operator.log",
        MEDFORGE_METRICS_PORT=str(port),
        MEDFORGE_METRICS_ADDRESS="127.0.0.1",
    )
    op.metrics_port = port
    op.start()
    time.sleep(1)
    yield op
    op.stop()


@pytest.fixture
def registered(cluster: ClusterAccess) -> Iterator[list[str]]:
    """Institutions created by the test (cluster-scoped), deleted afterwards."""
    names: list[str] = []
    yield names
    for n in names:
        cluster.kubectl("delete", "institution", n, "--wait=false", check=False)
