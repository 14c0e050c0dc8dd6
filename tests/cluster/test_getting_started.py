"""docs/getting-started.md works: every `sh` block it shows runs, in order, against the local
cluster and store, with its names made unique for this session."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from medforge_ml import synthetic
from tests.cluster.conftest import FORGE_POOL, ROOT, Forge, _forge_names
from tests.conftest import ClusterAccess

pytestmark = pytest.mark.usefixtures("operator")
GUIDE = ROOT / "docs" / "getting-started.md"


def blocks(text: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", text, flags=re.M | re.S)


def test_the_getting_started_commands_run(
    cluster: ClusterAccess, forge: Forge, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:6]
    hospital, forge_ns = f"gs-hospital-{tag}", FORGE_POOL[next(_forge_names)]
    script = "\n".join(blocks(GUIDE.read_text()))
    assert "medforge model push" in script and "medforge composite pull" in script
    script = (
        script.replace("hospital-a", hospital)
        .replace("medforge-forge", forge_ns)
        .replace("clip-vit-b16", f"clip-gs-{tag}")
    )
    env = dict(
        os.environ,
        PATH=os.pathsep.join(
            [
                str(Path(sys.executable).parent),
                str(Path(cluster.kubectl_path).parent),
                os.environ.get("PATH", ""),
            ]
        ),
        KUBECONFIG=str(cluster.kubeconfig),
        MODEL_DIR=str(synthetic.tiny_clip(tmp_path / "model")),
        MEDFORGE_STORE_ENDPOINT=forge.endpoint,
        MEDFORGE_STORE_BUCKET=forge.bucket,
        MEDFORGE_STORE_ACCESS_KEY_ID=forge.access_key,
        MEDFORGE_STORE_SECRET_ACCESS_KEY=forge.secret_key,
    )
    try:
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "Succeeded" in proc.stdout and "Revisions (newest first)" in proc.stdout
        export = json.loads((tmp_path / "foundation" / "medforge-export.json").read_text())
        assert export["revision"] == 1 and export["digest"].startswith("sha256:")
    finally:
        cluster.kubectl("delete", "namespace", hospital, forge_ns, "--wait=false", check=False)
