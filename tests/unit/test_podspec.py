"""The process kubelet's pure logic: env as a kubelet resolves it, scheduling fit, status."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from medforge_localcluster import podspec

POD: dict[str, Any] = {
    "metadata": {
        "name": "train-1",
        "namespace": "hospital-a",
        "uid": "u-1",
        "labels": {"app": "medforge"},
    },
    "spec": {"nodeName": "n1", "serviceAccountName": "default", "containers": []},
}
OBJECTS: dict[tuple[str, str], dict[str, Any]] = {
    ("Secret", "store"): {"data": {"key": base64.b64encode(b"s3cr3t").decode()}},
    ("ConfigMap", "settings"): {"data": {"LEVEL": "debug", "MODE": "fast"}},
}


def lookup(kind: str, name: str) -> dict[str, Any] | None:
    return OBJECTS.get((kind, name))


def test_env_values_refs_fields_and_expansion() -> None:
    container = {
        "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "CFG_"}],
        "env": [
            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "store", "key": "key"}}},
            {"name": "MSG", "value": "$(NS)/$(APP) $(UNKNOWN) $$(NS)"},
        ],
    }
    env = podspec.resolve_env(POD, container, lookup)
    assert env == {
        "CFG_LEVEL": "debug",
        "CFG_MODE": "fast",
        "NS": "hospital-a",
        "APP": "medforge",
        "KEY": "s3cr3t",
        "MSG": "hospital-a/medforge $(UNKNOWN) $(NS)",
    }


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ({"secretKeyRef": {"name": "absent", "key": "k"}}, 'secret "absent" not found'),
        (
            {"secretKeyRef": {"name": "store", "key": "nope"}},
            "couldn't find key nope in Secret hospital-a/store",
        ),
        ({"configMapKeyRef": {"name": "gone", "key": "k"}}, 'configmap "gone" not found'),
    ],
)
def test_missing_references_are_config_errors_in_kubelet_words(
    ref: dict[str, Any], message: str
) -> None:
    container = {"env": [{"name": "X", "valueFrom": ref}]}
    with pytest.raises(podspec.ConfigError) as err:
        podspec.resolve_env(POD, container, lookup)
    assert str(err.value) == message


def test_optional_references_may_be_missing() -> None:
    container = {
        "env": [
            {
                "name": "X",
                "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k", "optional": True}},
            }
        ]
    }
    assert podspec.resolve_env(POD, container, lookup) == {}


def test_command_is_required_and_expanded() -> None:
    with pytest.raises(podspec.ConfigError, match="must set `command`"):
        podspec.command_argv({"name": "c", "image": "x"}, {})
    argv = podspec.command_argv(
        {"command": ["medforge-train"], "args": ["--ns=$(NS)"]}, {"NS": "a"}
    )
    assert argv == ["medforge-train", "--ns=a"]


def test_scheduling_fit() -> None:
    labels = {"kubernetes.io/os": "linux"}
    pod = {
        "spec": {
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "containers": [{"resources": {"limits": {"nvidia.com/gpu": "2"}}}],
        }
    }
    assert podspec.unschedulable_reason(pod, labels, node_gpus=4, used_gpus=2) is None
    assert "Insufficient nvidia.com/gpu" in str(
        podspec.unschedulable_reason(pod, labels, node_gpus=4, used_gpus=3)
    )
    other = {"spec": {"nodeSelector": {"pool": "gpu"}, "containers": []}}
    assert "selector" in str(podspec.unschedulable_reason(other, labels, 0, 0))


def test_termination_message_and_exit_codes() -> None:
    assert podspec.termination_message(b"x" * 5000, "File", True, b"") == "x" * 4096
    logs = b"\n".join(f"line {i}".encode() for i in range(200))
    msg = podspec.termination_message(b"", "FallbackToLogsOnError", True, logs)
    assert msg.endswith("line 199") and "line 119" not in msg
    assert podspec.termination_message(b"", "File", True, logs) == ""
    assert podspec.exit_code(-9) == 137 and podspec.exit_code(-15) == 143
    assert podspec.exit_code(3) == 3
    assert podspec.pod_phase([0, 0]) == "Succeeded" and podspec.pod_phase([0, 1]) == "Failed"


def test_terminated_state_reasons() -> None:
    assert podspec.terminated_state(0, "a", "b", "")["terminated"]["reason"] == "Completed"
    state = podspec.terminated_state(2, "a", "b", "why")["terminated"]
    assert state["reason"] == "Error" and state["message"] == "why"
