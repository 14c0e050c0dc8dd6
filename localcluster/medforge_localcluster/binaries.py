"""Finding or building the upstream binaries the local cluster runs.

Order of preference for each binary: ``KUBEBUILDER_ASSETS``, then ``PATH``, then this project's
cache, and only then a build from the Go modules pinned under ``localcluster/go``. Builds go to a
cache directory outside the repository, keyed by version, so they survive ``git clean`` and are
shared by every checkout on the machine.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from medforge_localcluster.errors import SetupError

KUBERNETES_VERSION = "v1.35.4"
ETCD_VERSION = "v3.6.16"
VERSITYGW_VERSION = "v1.8.0"
HELM_VERSION = "v3.22.0"
PROMETHEUS_VERSION = "v0.316.0"  # Prometheus 3.16.0 (its Go module is tagged v0.3xx.y)
CLI_UTILS_VERSION = "v0.37.2"  # sigs.k8s.io/cli-utils, whose kstatus Flux and kpt use
HELM_K8S_MINOR = "37"  # the k8s.io modules helm v3.22.0 is built with (client-go v0.37)
MIN_KUBERNETES = (1, 34)
# Free space a cold build needs: module downloads plus Go's build cache (measured ~3 GiB).
BUILD_DISK_BYTES = 5 * 1024**3

GO_DIR = Path(__file__).resolve().parent.parent / "go"


@dataclass(frozen=True)
class Component:
    """A group of binaries built together from one wrapper Go module."""

    name: str
    version: str
    module_dir: str
    packages: dict[str, str]  # binary name -> Go package path ("." for the wrapper's own main)
    min_go: tuple[int, int]
    ldflags: str = ""


def _k8s_version_flags(version: str) -> str:
    """Stamp the version the way Kubernetes' own build does (it is read from git otherwise)."""
    major, minor = version.lstrip("v").split(".")[:2]
    flags = []
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {pkg}.gitVersion={version}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
        ]
    return " ".join(flags)


COMPONENTS = (
    Component(
        "kubernetes",
        KUBERNETES_VERSION,
        "k8s",
        {
            "kube-apiserver": "k8s.io/kubernetes/cmd/kube-apiserver",
            "kube-controller-manager": "k8s.io/kubernetes/cmd/kube-controller-manager",
            "kubectl": "k8s.io/kubernetes/cmd/kubectl",
        },
        (1, 25),
        _k8s_version_flags(KUBERNETES_VERSION),
    ),
    Component("etcd", ETCD_VERSION, "etcd", {"etcd": "."}, (1, 26)),
    Component(
        "versitygw",
        VERSITYGW_VERSION,
        "s3",
        {"versitygw": "github.com/versity/versitygw/cmd/versitygw"},
        (1, 25),
    ),
    # helm renders and lints the chart in the tests, as a user would install it.
    Component(
        "helm",
        HELM_VERSION,
        "helm",
        {"helm": "helm.sh/helm/v3/cmd/helm"},
        (1, 26),
        # As helm's own build stamps them; otherwise it assumes Kubernetes 1.20 when rendering.
        f"-X helm.sh/helm/v3/internal/version.version={HELM_VERSION} "
        + " ".join(
            f"-X helm.sh/helm/v3/pkg/{pkg}.k8sVersion{part}={value}"
            for pkg in ("lint/rules", "chartutil")
            for part, value in (("Major", "1"), ("Minor", HELM_K8S_MINOR))
        ),
    ),
)
# Used by the tests only: a real Prometheus scraping the operator and evaluating the chart's
# alerts, promtool checking them, and kstatus-check computing what Flux and kpt would see.
TEST_COMPONENTS = (
    Component(
        "prometheus",
        PROMETHEUS_VERSION,
        "prometheus",
        {
            "prometheus": "github.com/prometheus/prometheus/cmd/prometheus",
            "promtool": "github.com/prometheus/prometheus/cmd/promtool",
        },
        (1, 26),
        "-X github.com/prometheus/common/version.Version=3."
        + PROMETHEUS_VERSION.split(".")[1][1:].lstrip("0")
        + "."
        + PROMETHEUS_VERSION.split(".")[2],
    ),
    Component("kstatus", CLI_UTILS_VERSION, "kstatus", {"kstatus-check": "."}, (1, 25)),
)
BINARIES = {b: c for c in (*COMPONENTS, *TEST_COMPONENTS) for b in c.packages}
# Binaries whose version is checked before use: the control plane must be >= 1.34, and kubectl
# within the supported skew of it (a machine's older kubectl on PATH is passed over).
VERSIONED = {"kube-apiserver", "kube-controller-manager", "kubectl"}


def cache_root() -> Path:
    if env := os.environ.get("MEDFORGE_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "medforge"


def cache_dir(component: Component) -> Path:
    return cache_root() / "bin" / f"{component.name}-{component.version}"


def _kubernetes_version_ok(path: Path) -> bool:
    """True when the binary reports Kubernetes >= MIN_KUBERNETES."""
    try:
        out = subprocess.run(
            [str(path), *(["version", "--client"] if path.name == "kubectl" else ["--version"])],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    m = re.search(r"v(\d+)\.(\d+)", out)
    return bool(m) and (int(m.group(1)), int(m.group(2))) >= MIN_KUBERNETES  # type: ignore[union-attr]


def find(binary: str) -> Path | None:
    """Locate a binary without building anything."""
    candidates: list[Path] = []
    if assets := os.environ.get("KUBEBUILDER_ASSETS"):
        candidates.append(Path(assets) / binary)
    if on_path := shutil.which(binary):
        candidates.append(Path(on_path))
    candidates.append(cache_dir(BINARIES[binary]) / binary)
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            if binary in VERSIONED and not _kubernetes_version_ok(path):
                continue
            return path
    return None


def _go_version(go: str) -> tuple[int, int]:
    out = subprocess.run(
        [go, "env", "GOVERSION"], capture_output=True, text=True, check=True
    ).stdout.strip()
    m = re.match(r"go(\d+)\.(\d+)", out)
    if not m:
        raise SetupError(f"could not read the Go version from {out!r}")
    return int(m.group(1)), int(m.group(2))


def _check_toolchain(component: Component) -> str:
    go = os.environ.get("GO") or shutil.which("go")
    if not go:
        raise SetupError(
            f"the Go toolchain is needed to build {component.name} {component.version} "
            "and was not found on PATH",
            hint=f"install Go >= 1.{component.min_go[1]} (or set GO=/path/to/go), or point "
            "KUBEBUILDER_ASSETS at a directory holding kube-apiserver, kube-controller-manager, "
            "kubectl and etcd",
        )
    have = _go_version(go)
    if have < component.min_go:
        raise SetupError(
            f"Go {have[0]}.{have[1]} is too old to build {component.name} {component.version}",
            hint=f"install Go >= {component.min_go[0]}.{component.min_go[1]}",
        )
    return go


def _check_disk(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
    if free < BUILD_DISK_BYTES:
        raise SetupError(
            f"only {free / 1024**3:.1f} GiB free under {path}; building the cluster binaries "
            f"needs about {BUILD_DISK_BYTES / 1024**3:.0f} GiB",
            hint="free some space, or set MEDFORGE_CACHE_DIR (and GOCACHE, GOMODCACHE) to a "
            "larger disk",
        )


def build(component: Component, log: bool = True) -> Path:
    """Build every binary of one component into its cache directory and return that directory."""
    go = _check_toolchain(component)
    target = cache_dir(component)
    _check_disk(target.parent)
    gocache = subprocess.run(
        [go, "env", "GOCACHE"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if gocache:
        _check_disk(Path(gocache))
    if log:
        print(
            f"building {component.name} {component.version} "
            f"({', '.join(component.packages)}); a cold build takes several minutes",
            flush=True,
        )
    env = dict(os.environ, GOTOOLCHAIN="local", CGO_ENABLED="0")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-") as tmp:
        pkgs = list(component.packages.values())
        ldflags = f"-s -w {component.ldflags}".strip()
        cmd = [go, "build", "-trimpath", f"-ldflags={ldflags}", "-o", tmp + "/", *pkgs]
        proc = subprocess.run(
            cmd, cwd=GO_DIR / component.module_dir, env=env, capture_output=True, text=True
        )
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise SetupError(
                f"building {component.name} {component.version} failed:\n{tail}",
                hint="check the network access to the Go module proxy and the free disk space; "
                "the full command was: " + " ".join(cmd),
            )
        if "." in component.packages.values():
            # `go build .` names the output after the module's last path element.
            built = Path(tmp) / Path(component.module_dir).name
            built.rename(Path(tmp) / next(iter(component.packages)))
        for binary in component.packages:
            if not (Path(tmp) / binary).is_file():
                raise SetupError(f"the build of {component.name} produced no {binary}")
        if target.exists():
            shutil.rmtree(target)
        Path(tmp).chmod(0o755)
        Path(tmp).rename(target)
        # The TemporaryDirectory context would remove the renamed directory's old name only.
        Path(tmp).mkdir()
    return target


def ensure(binaries: list[str] | None = None, log: bool = True) -> dict[str, Path]:
    """Return a path for every binary, building the missing components once each."""
    wanted = binaries or [b for c in COMPONENTS for b in c.packages]  # the cluster's own
    found: dict[str, Path] = {}
    missing: dict[str, Component] = {}
    for b in wanted:
        path = find(b)
        if path is None:
            missing[BINARIES[b].name] = BINARIES[b]
        else:
            found[b] = path
    for component in missing.values():
        directory = build(component, log=log)
        for b in component.packages:
            if b in wanted:
                found[b] = directory / b
    return found


def main() -> int:
    """Build every missing binary with the standard library alone (no virtual environment), so
    `make test` can start the Go builds first and run lint and unit tests meanwhile."""
    try:
        for name, path in sorted(ensure(list(BINARIES)).items()):
            print(f"{name}: {path}", flush=True)
    except SetupError as exc:
        print(f"error: {exc}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
