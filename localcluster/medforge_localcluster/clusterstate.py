"""Where a local cluster keeps its state: the directory, the ports and process records (state.json), and the kubeconfigs it writes."""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medforge_localcluster import binaries
from medforge_localcluster.processes import (
    ProcessRecord,
)


def default_state_dir() -> Path:
    if env := os.environ.get("MEDFORGE_LOCALCLUSTER_DIR"):
        return Path(env)
    return binaries.cache_root() / "localcluster"


@dataclass
class State:
    ports: dict[str, int] = field(default_factory=dict)
    processes: dict[str, ProcessRecord] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> State:
        if not path.exists():
            return cls()
        data = json.loads(path.read_text())
        return cls(
            ports={k: int(v) for k, v in data.get("ports", {}).items()},
            processes={k: ProcessRecord.from_json(v) for k, v in data.get("processes", {}).items()},
        )

    def save(self, path: Path) -> None:
        data = {
            "ports": self.ports,
            "processes": {k: v.to_json() for k, v in self.processes.items()},
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(path)


def kubeconfig_doc(server: str, ca: Path, token: str, user: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "medforge-local",
                "cluster": {
                    "server": server,
                    "certificate-authority-data": base64.b64encode(ca.read_bytes()).decode(),
                },
            }
        ],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [
            {"name": "medforge-local", "context": {"cluster": "medforge-local", "user": user}}
        ],
        "current-context": "medforge-local",
    }
