"""The process kubelet's container mode: pods run from OCI images with runc.

Enabled with MEDFORGE_KUBELET_RUNTIME=container; MEDFORGE_KUBELET_IMAGES names the image
layout (default: the repository's build/images/oci, what `make images` writes). Each pod gets
its own network namespace (`netns`), which relays the API server's and the S3 server's ports
to the host. Each container's root is an overlay of its image's unpacked layers (cached by
diff_id under ~/.cache/medforge/layers) with a writable layer of its own; runc makes it read-
only when the pod asks for readOnlyRootFilesystem, and applies the user, mounts, capabilities,
no_new_privs and memory, CPU and pid limits (cgroups).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medforge_localcluster import containerspec, ocistore
from medforge_localcluster.podspec import ConfigError

JSON = dict[str, Any]
ROOT = Path(__file__).resolve().parents[2]
DEFAULT_LAYOUT = ROOT / "build" / "images" / "oci"
DEFAULT_CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "medforge" / "layers"
)


class ImagePullError(ConfigError):
    """The pod's image is not in the local store (the kubelet's ErrImagePull)."""

    reason = "ErrImagePull"


@dataclass(frozen=True)
class Plan:
    image: ocistore.Image
    spec: containerspec.Container


class Runtime:
    def __init__(self, state_dir: Path, store: ocistore.Store, forward: list[int]) -> None:
        self.state = state_dir / "runc"
        self.store = store
        self.forward = forward
        self.runc = shutil.which("runc") or "runc"

    @classmethod
    def from_env(cls, kubelet_dir: Path, env: Mapping[str, str], api_port: int) -> Runtime | None:
        if env.get("MEDFORGE_KUBELET_RUNTIME", "process") != "container":
            return None
        if shutil.which("runc") is None:
            raise SystemExit("container mode needs runc: `apt-get install runc`")
        layout = Path(env.get("MEDFORGE_KUBELET_IMAGES") or DEFAULT_LAYOUT)
        cache = Path(env.get("MEDFORGE_KUBELET_LAYER_CACHE") or DEFAULT_CACHE)
        ports = [api_port]
        ports += [int(p) for p in env.get("MEDFORGE_KUBELET_FORWARD_PORTS", "").split(",") if p]
        return cls(kubelet_dir, ocistore.Store(layout, cache), ports)

    def plan(self, pod: JSON, c: JSON, env: Mapping[str, str]) -> Plan:
        try:
            image = self.store.resolve(str(c.get("image") or ""))
        except ocistore.ImageError as exc:
            raise ImagePullError(str(exc)) from exc
        return Plan(image, containerspec.container(pod, c, image.config, env))

    def pod_network(self, pod_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
        """Start the pod's network namespace; returns its holder process and namespace path."""
        with (pod_dir / "netns.log").open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "medforge_localcluster.netns", *map(str, self.forward)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )
        if proc.stdout is None or proc.stdout.readline().strip() != b"ready":
            proc.kill()
            raise ConfigError(
                f"the pod's network namespace did not start (see {pod_dir / 'netns.log'})"
            )
        return proc, f"/proc/{proc.pid}/ns/net"

    def bundle(
        self,
        plan: Plan,
        cdir: Path,
        cid: str,
        hostname: str,
        netns: str,
        mounts: list[containerspec.Mount],
    ) -> list[str]:
        """Mount the container's root and write its runc bundle; returns runc's argv."""
        layers = self.store.unpacked(plan.image)
        rootfs, upper, work = cdir / "rootfs", cdir / "upper", cdir / "work"
        self.release(cdir, cid)
        for d in (rootfs, upper, work):
            d.mkdir(parents=True, exist_ok=True)
        hosts = cdir / "hosts"
        hosts.write_text(f"127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\t{hostname}\n")
        options = f"lowerdir={':'.join(map(str, layers))},upperdir={upper},workdir={work}"
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", options, str(rootfs)], check=True
        )
        config = containerspec.runtime_config(
            plan.spec,
            str(rootfs),
            hostname,
            netns,
            [*mounts, containerspec.Mount(str(hosts), "/etc/hosts", read_only=True)],
            f"/medforge/{cid}",
        )
        (cdir / "config.json").write_text(json.dumps(config))
        return [self.runc, "--root", str(self.state), "run", "--bundle", str(cdir), cid]

    def kill(self, cid: str, sig: int) -> None:
        subprocess.run(
            [self.runc, "--root", str(self.state), "kill", cid, str(sig)],
            capture_output=True,
            check=False,
        )

    def release(self, cdir: Path, cid: str) -> None:
        release_container(str(self.state), cid, cdir)


def release_container(runc_root: str, cid: str, bundle: Path) -> None:
    """End the container (if runc still knows it), unmount its root and drop its writable
    layer; each part may already be gone."""
    runc = shutil.which("runc") or "runc"
    subprocess.run(
        [runc, "--root", runc_root, "delete", "--force", cid], capture_output=True, check=False
    )
    rootfs = bundle / "rootfs"
    if os.path.ismount(rootfs):
        subprocess.run(["umount", "--lazy", str(rootfs)], capture_output=True, check=False)
    with contextlib.suppress(OSError):
        rootfs.rmdir()
    for d in ("upper", "work"):
        shutil.rmtree(bundle / d, ignore_errors=True)
