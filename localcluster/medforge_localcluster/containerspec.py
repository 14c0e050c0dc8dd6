"""Pure functions of the kubelet's container mode: a pod's container and its image's config
become an OCI runtime configuration (runc's config.json).

Kubernetes' rules: `command` replaces the image's Entrypoint (and drops its Cmd), `args`
replace Cmd; the pod's env goes over the image's; runAsUser/runAsGroup go over the image's
USER; runAsNonRoot refuses uid 0. Free of I/O, unit-tested without a cluster.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from medforge_localcluster.podspec import ConfigError, expand

JSON = dict[str, Any]
# runc's default set, as `runc spec` writes it: what an unprivileged container keeps unless
# the pod drops it.
DEFAULT_CAPS = ("CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE")
MASKED = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
)
READONLY = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool = False


@dataclass(frozen=True)
class Container:
    """What the runtime needs of one container, resolved from the pod and the image."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    uid: int
    gid: int
    groups: list[int] = field(default_factory=list)
    read_only_root: bool = False
    no_new_privileges: bool = False
    capabilities: list[str] = field(default_factory=lambda: list(DEFAULT_CAPS))
    memory_limit: int | None = None
    cpu_quota: int | None = None  # microseconds per 100 ms period


def image_argv(container: JSON, image: JSON, env: Mapping[str, str]) -> list[str]:
    entrypoint = list(image.get("Entrypoint") or [])
    cmd = list(image.get("Cmd") or [])
    if container.get("command"):
        argv = [*container["command"], *(container.get("args") or [])]
    else:
        argv = [*entrypoint, *(container.get("args") or cmd)]
    if not argv:
        raise ConfigError("no command specified: neither the container nor its image sets one")
    return [expand(a, env) for a in argv]


def _user(pod: JSON, container: JSON, image: JSON) -> tuple[int, int]:
    pod_sc = pod.get("spec", {}).get("securityContext") or {}
    sc = container.get("securityContext") or {}
    name, _, group = str(image.get("User") or "0").partition(":")
    if not name.isdigit() or (group and not group.isdigit()):
        # The kubelet cannot verify a named user either (it needs a numeric runAsUser).
        if sc.get("runAsUser", pod_sc.get("runAsUser")) is None:
            raise ConfigError(f"image's user {image.get('User')!r} is not numeric: set runAsUser")
        name, group = "0", ""
    uid = int(sc.get("runAsUser", pod_sc.get("runAsUser", name)))
    gid = int(sc.get("runAsGroup", pod_sc.get("runAsGroup", group or 0)))
    if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) and uid == 0:
        raise ConfigError("container has runAsNonRoot and image will run as root")
    return uid, gid


def _capabilities(sc: JSON) -> list[str]:
    caps = sc.get("capabilities") or {}
    drop = {str(c).upper() for c in caps.get("drop") or []}
    keep = [] if "ALL" in drop else [c for c in DEFAULT_CAPS if c.removeprefix("CAP_") not in drop]
    return sorted(
        {*keep, *(f"CAP_{str(c).upper().removeprefix('CAP_')}" for c in caps.get("add") or [])}
    )


def quantity(value: str) -> int:
    """A memory quantity in bytes ("512Mi", "1G", "1e9")."""
    units = {
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
        "k": 10**3,
        "M": 10**6,
        "G": 10**9,
        "T": 10**12,
    }
    for unit, factor in units.items():
        if value.endswith(unit):
            return int(float(value[: -len(unit)]) * factor)
    return int(float(value))


def millicpu(value: str) -> int:
    return int(value[:-1]) if value.endswith("m") else int(float(value) * 1000)


def container(pod: JSON, c: JSON, image: JSON, env: Mapping[str, str]) -> Container:
    """The runtime's view of container `c` of `pod` run from an image whose config is `image`."""
    pod_sc = pod.get("spec", {}).get("securityContext") or {}
    sc = c.get("securityContext") or {}
    image_env = dict(e.split("=", 1) for e in image.get("Env") or [] if "=" in e)
    full_env = {**image_env, **env}
    uid, gid = _user(pod, c, image)
    limits = (c.get("resources") or {}).get("limits") or {}
    groups = [int(g) for g in pod_sc.get("supplementalGroups") or []]
    if pod_sc.get("fsGroup") is not None:
        groups.append(int(pod_sc["fsGroup"]))
    return Container(
        argv=image_argv(c, image, full_env),
        env=full_env,
        cwd=c.get("workingDir") or image.get("WorkingDir") or "/",
        uid=uid,
        gid=gid,
        groups=groups,
        read_only_root=bool(sc.get("readOnlyRootFilesystem")),
        no_new_privileges=sc.get("allowPrivilegeEscalation") is False,
        capabilities=_capabilities(sc),
        memory_limit=quantity(str(limits["memory"])) if "memory" in limits else None,
        cpu_quota=millicpu(str(limits["cpu"])) * 100 if "cpu" in limits else None,
    )


def runtime_config(
    spec: Container, rootfs: str, hostname: str, netns: str, mounts: list[Mount], cgroup: str
) -> JSON:
    """runc's config.json for one container (OCI runtime spec 1.0)."""
    caps = list(spec.capabilities)
    resources: JSON = {"pids": {"limit": 4096}}
    if spec.memory_limit is not None:
        resources["memory"] = {"limit": spec.memory_limit}
    if spec.cpu_quota is not None:
        resources["cpu"] = {"quota": spec.cpu_quota, "period": 100_000}
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": spec.uid, "gid": spec.gid, "additionalGids": spec.groups},
            "args": spec.argv,
            "env": [f"{k}={v}" for k, v in spec.env.items()],
            "cwd": spec.cwd,
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "noNewPrivileges": spec.no_new_privileges,
        },
        "root": {"path": rootfs, "readonly": spec.read_only_root},
        "hostname": hostname,
        "mounts": [*_system_mounts(), *(_bind(m) for m in mounts)],
        "linux": {
            "cgroupsPath": cgroup,
            "resources": resources,
            "namespaces": [
                {"type": "pid"},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
                {"type": "network", "path": netns},
            ],
            "maskedPaths": list(MASKED),
            "readonlyPaths": list(READONLY),
        },
    }


def _bind(m: Mount) -> JSON:
    options = ["rbind", "ro" if m.read_only else "rw", "nosuid", "nodev"]
    return {"destination": m.target, "type": "bind", "source": m.source, "options": options}


def _system_mounts() -> list[JSON]:
    return [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
        },
        {
            "destination": "/dev/shm",  # noqa: S108 - inside the container
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"],
        },
    ]
