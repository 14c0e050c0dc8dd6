"""The kubelet's container mode, pure part: a pod's container plus its image's config become
runc's config.json by Kubernetes' rules."""

from __future__ import annotations

from typing import Any

import pytest

from medforge_localcluster import containerspec
from medforge_localcluster.podspec import ConfigError

IMAGE = {
    "User": "10001:10001",
    "Env": ["PATH=/opt/medforge/bin:/usr/bin", "HF_HUB_OFFLINE=1"],
    "Entrypoint": ["/opt/medforge/bin/medforge-train"],
    "Cmd": ["--help"],
    "WorkingDir": "/scratch",
}


def _pod(container: dict[str, Any], **pod_sc: Any) -> dict[str, Any]:
    return {"spec": {"securityContext": pod_sc, "containers": [container]}}


def test_command_and_args_follow_kubernetes_over_the_image() -> None:
    c: dict[str, Any] = {"name": "c"}
    assert containerspec.image_argv(c, IMAGE, {}) == ["/opt/medforge/bin/medforge-train", "--help"]
    assert containerspec.image_argv({"args": ["$(X)"]}, IMAGE, {"X": "y"}) == [
        "/opt/medforge/bin/medforge-train",
        "y",
    ]
    assert containerspec.image_argv({"command": ["python"]}, IMAGE, {}) == ["python"]
    with pytest.raises(ConfigError, match="no command"):
        containerspec.image_argv({}, {}, {})


def test_user_env_and_workdir_come_from_the_image_unless_the_pod_says() -> None:
    spec = containerspec.container(
        _pod({"name": "c"}), {"name": "c"}, IMAGE, {"HF_HUB_OFFLINE": "0", "A": "b"}
    )
    assert (spec.uid, spec.gid, spec.cwd) == (10001, 10001, "/scratch")
    assert spec.env["PATH"].startswith("/opt/medforge/bin") and spec.env["HF_HUB_OFFLINE"] == "0"
    c = {"name": "c", "workingDir": "/w", "securityContext": {"runAsUser": 2000}}
    spec = containerspec.container(_pod(c, runAsGroup=3000, fsGroup=4000), c, IMAGE, {})
    assert (spec.uid, spec.gid, spec.cwd, spec.groups) == (2000, 3000, "/w", [4000])


def test_run_as_non_root_refuses_an_image_that_runs_as_root() -> None:
    c = {"name": "c"}
    with pytest.raises(ConfigError, match="runAsNonRoot"):
        containerspec.container(_pod(c, runAsNonRoot=True), c, {"Entrypoint": ["x"]}, {})
    with pytest.raises(ConfigError, match="not numeric"):
        containerspec.container(_pod(c), c, {"User": "app", "Entrypoint": ["x"]}, {})


def test_the_restricted_security_context_reaches_runc() -> None:
    c = {
        "name": "c",
        "securityContext": {
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
        "resources": {"limits": {"memory": "512Mi", "cpu": "250m"}},
    }
    spec = containerspec.container(_pod(c), c, IMAGE, {})
    mounts = [
        containerspec.Mount("/host/tmp", "/tmp"),
        containerspec.Mount("/host/s", "/secrets", True),
    ]
    cfg = containerspec.runtime_config(
        spec, "/r", "pod-a", "/proc/42/ns/net", mounts, "/medforge/x"
    )
    assert cfg["root"] == {"path": "/r", "readonly": True}
    assert cfg["process"]["noNewPrivileges"] is True
    assert cfg["process"]["capabilities"]["bounding"] == []
    assert cfg["process"]["user"]["uid"] == 10001
    assert cfg["linux"]["resources"]["memory"] == {"limit": 512 * 2**20}
    assert cfg["linux"]["resources"]["cpu"] == {"quota": 25_000, "period": 100_000}
    assert {"type": "network", "path": "/proc/42/ns/net"} in cfg["linux"]["namespaces"]
    binds = {m["destination"]: m["options"] for m in cfg["mounts"] if m["type"] == "bind"}
    assert "ro" in binds["/secrets"] and "rw" in binds["/tmp"]


def test_quantities() -> None:
    assert containerspec.quantity("1Gi") == 2**30
    assert containerspec.quantity("1G") == 10**9
    assert containerspec.quantity("1e3") == 1000
    assert containerspec.millicpu("2") == 2000 and containerspec.millicpu("500m") == 500
