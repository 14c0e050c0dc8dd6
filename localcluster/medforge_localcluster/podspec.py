"""Pure functions of the process kubelet: scheduling fit, env resolution, status documents.

Kept free of I/O (lookups are passed in) so that they are unit-tested without a cluster.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
from collections.abc import Callable, Mapping
from typing import Any

JSON = dict[str, Any]
TERMINAL = ("Succeeded", "Failed")
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
# What a kubelet keeps of a termination message (bytes).
MAX_TERMINATION_MESSAGE = 4096
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048


class ConfigError(Exception):
    """A container cannot start because its configuration cannot be resolved (kubelet's
    CreateContainerConfigError): a missing Secret, ConfigMap or key."""


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str) -> dt.datetime:
    return dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)


# ----- scheduling -----


def gpu_request(pod: JSON) -> int:
    total = 0
    for c in pod.get("spec", {}).get("containers", []):
        res = c.get("resources") or {}
        value = (res.get("limits") or {}).get("nvidia.com/gpu") or (res.get("requests") or {}).get(
            "nvidia.com/gpu"
        )
        total += int(value or 0)
    return total


def unschedulable_reason(
    pod: JSON, node_labels: Mapping[str, str], node_gpus: int, used_gpus: int
) -> str | None:
    """Why this node cannot take the pod, in the scheduler's words, or None if it fits."""
    selector = pod.get("spec", {}).get("nodeSelector") or {}
    mismatched = sorted(k for k, v in selector.items() if node_labels.get(k) != v)
    if mismatched:
        return "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."
    gpus = gpu_request(pod)
    if gpus and gpus + used_gpus > node_gpus:
        return "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
    return None


def is_terminal(pod: JSON) -> bool:
    return pod.get("status", {}).get("phase") in TERMINAL


# ----- env -----

_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)")


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes $(VAR) expansion: known names are replaced, unknown ones kept, $$ escapes."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env.get(name, m.group(0))

    return _VAR_REF.sub(sub, value)


Lookup = Callable[[str, str], JSON | None]  # (kind "Secret"|"ConfigMap", name) -> object or None


def _data_value(obj: JSON, kind: str, key: str) -> str | None:
    if kind == "Secret":
        raw = (obj.get("data") or {}).get(key)
        if raw is not None:
            return base64.b64decode(raw).decode()
        return (obj.get("stringData") or {}).get(key)
    value = (obj.get("data") or {}).get(key)
    if value is None and key in (obj.get("binaryData") or {}):
        return base64.b64decode(obj["binaryData"][key]).decode()
    return value


def _field_value(pod: JSON, path: str) -> str:
    meta = pod.get("metadata", {})
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": pod.get("spec", {}).get("nodeName", ""),
        "spec.serviceAccountName": pod.get("spec", {}).get("serviceAccountName", ""),
        "status.hostIP": "127.0.0.1",
        "status.podIP": "127.0.0.1",
    }
    if path in simple:
        return str(simple[path])
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    raise ConfigError(f"unsupported fieldRef {path!r}")


def _fetch(lookup: Lookup, kind: str, name: str, optional: bool) -> JSON | None:
    obj = lookup(kind, name)
    if obj is None and not optional:
        raise ConfigError(f'{kind.lower()} "{name}" not found')
    return obj


def _env_from(container: JSON, lookup: Lookup) -> dict[str, str]:
    """Variables from whole Secrets and ConfigMaps (envFrom), with their prefixes."""
    env: dict[str, str] = {}
    for src in container.get("envFrom") or []:
        prefix = src.get("prefix", "")
        for kind, ref in (("Secret", src.get("secretRef")), ("ConfigMap", src.get("configMapRef"))):
            obj = _fetch(lookup, kind, ref["name"], bool(ref.get("optional"))) if ref else None
            for key in sorted((obj or {}).get("data") or {}):
                value = _data_value(obj or {}, kind, key)
                if value is not None:
                    env[prefix + key] = value
    return env


def _key_ref(ns: str, vf: JSON, lookup: Lookup) -> tuple[bool, str | None]:
    """(whether a Secret or ConfigMap key reference was given, its value or None when an
    optional one is missing)."""
    for kind, ref_key in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
        ref = vf.get(ref_key)
        if not ref:
            continue
        optional = bool(ref.get("optional"))
        obj = _fetch(lookup, kind, ref["name"], optional)
        value = _data_value(obj, kind, ref["key"]) if obj is not None else None
        if value is None and obj is not None and not optional:
            raise ConfigError(f"couldn't find key {ref['key']} in {kind} {ns}/{ref['name']}")
        return True, value
    return False, None


def _value_from(pod: JSON, container: JSON, vf: JSON, lookup: Lookup) -> str | None:
    given, value = _key_ref(pod["metadata"]["namespace"], vf, lookup)
    if given:
        return value
    if "fieldRef" in vf:
        return _field_value(pod, vf["fieldRef"]["fieldPath"])
    if "resourceFieldRef" in vf:
        kind_, _, rname = vf["resourceFieldRef"]["resource"].partition(".")
        limit = ((container.get("resources") or {}).get(kind_) or {}).get(rname)
        return str(limit if limit is not None else 0)
    return None


def resolve_env(pod: JSON, container: JSON, lookup: Lookup) -> dict[str, str]:
    """The container's environment as a kubelet computes it, or ConfigError naming what is
    missing, in the kubelet's words."""
    env = _env_from(container, lookup)
    for var in container.get("env") or []:
        name = var["name"]
        if "valueFrom" not in var:
            env[name] = expand(var.get("value", ""), env)
            continue
        value = _value_from(pod, container, var["valueFrom"], lookup)
        if value is not None:
            env[name] = value
    return env


def command_argv(container: JSON, env: Mapping[str, str]) -> list[str]:
    command = container.get("command") or []
    if not command:
        raise ConfigError(
            "the process kubelet runs no images: the container must set `command` "
            "(an executable in the project's environment)"
        )
    return [expand(a, env) for a in [*command, *(container.get("args") or [])]]


# ----- status -----


def waiting_status(container: JSON, reason: str, message: str = "", restarts: int = 0) -> JSON:
    state: JSON = {"waiting": {"reason": reason}}
    if message:
        state["waiting"]["message"] = message
    return _container_status(container, state, restarts, False)


def running_status(
    container: JSON, started_at: str, pid: int, restarts: int = 0, last_state: JSON | None = None
) -> JSON:
    st = _container_status(container, {"running": {"startedAt": started_at}}, restarts, True)
    st["containerID"] = f"process://{pid}"
    st["started"] = True
    if last_state:
        st["lastState"] = last_state
    return st


def terminated_state(
    exit_code: int, started_at: str, finished_at: str, message: str, reason: str | None = None
) -> JSON:
    term: JSON = {
        "exitCode": exit_code,
        "reason": reason or ("Completed" if exit_code == 0 else "Error"),
        "startedAt": started_at,
        "finishedAt": finished_at,
    }
    if message:
        term["message"] = message
    return {"terminated": term}


def terminated_status(container: JSON, state: JSON, pid: int, restarts: int = 0) -> JSON:
    st = _container_status(container, state, restarts, False)
    st["containerID"] = f"process://{pid}"
    st["started"] = False
    return st


def _container_status(container: JSON, state: JSON, restarts: int, ready: bool) -> JSON:
    return {
        "name": container["name"],
        "image": container.get("image", ""),
        "imageID": "",
        "ready": ready,
        "restartCount": restarts,
        "state": state,
    }


def exit_code(returncode: int) -> int:
    """Popen's -N for a signal becomes 128+N, as a container runtime reports it."""
    return 128 - returncode if returncode < 0 else returncode


def termination_message(file_bytes: bytes, policy: str, failed: bool, log_tail: bytes) -> str:
    message = file_bytes[:MAX_TERMINATION_MESSAGE].decode(errors="replace")
    if not message.strip() and failed and policy == "FallbackToLogsOnError":
        lines = log_tail.splitlines()[-FALLBACK_LOG_LINES:]
        message = b"\n".join(lines)[-FALLBACK_LOG_BYTES:].decode(errors="replace")
    return message


def pod_conditions(phase: str, ready: bool, since: str, reason: str = "") -> list[JSON]:
    def cond(ctype: str, status: bool, why: str = "") -> JSON:
        c: JSON = {
            "type": ctype,
            "status": "True" if status else "False",
            "lastTransitionTime": since,
            "lastProbeTime": None,
        }
        if why:
            c["reason"] = why
        return c

    done_reason = "PodCompleted" if phase in TERMINAL else reason
    return [
        cond("PodScheduled", True),
        cond("Initialized", True),
        cond("ContainersReady", ready, "" if ready else done_reason or "ContainersNotReady"),
        cond("Ready", ready, "" if ready else done_reason or "ContainersNotReady"),
    ]


def pod_phase(exit_codes: list[int]) -> str:
    return "Succeeded" if all(c == 0 for c in exit_codes) else "Failed"
