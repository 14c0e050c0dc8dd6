"""What a platform team deploys, run as it would run: pods from the built images (container
mode of the process kubelet, runc), the chart installed with helm, its two operator replicas
electing a leader, one contribution trained by the trainer image and one revision merged by
the merger image on a tiny generated model."""

from __future__ import annotations

import functools
import json
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from medforge_localcluster import binaries
from medforge_localcluster.s3 import client
from tests.cluster.test_end_to_end import contribution_doc
from tests.conftest import ClusterAccess
from tests.helpers import wait_until
from tests.merge_experiment import INSTITUTIONS
from tests.train_helpers import make_dataset, prepare, tiny_clip

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv"
OPERATOR, TRAINER, MERGER = (
    f"ghcr.io/medforge/{n}:0.1.0" for n in ("operator", "trainer", "merger")
)
PROBE = """
import json, os, sys
try:
    open("/usr/probe", "w")
    writable = True
except OSError:
    writable = False
print(json.dumps({"prefix": sys.prefix, "executable": sys.executable, "uid": os.getuid(),
                  "gid": os.getgid(), "venv_visible": os.path.exists(sys.argv[1]),
                  "root_writable": writable, "hf_offline": os.environ.get("HF_HUB_OFFLINE")}))
"""
JSONDict = dict[str, Any]


def _pod(name: str, image: str, argv: list[str]) -> str:
    restricted = {
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    container = {
        "name": "main",
        "image": image,
        "command": argv,
        "securityContext": restricted,
        "resources": {"limits": {"memory": "512Mi", "cpu": "1"}},
    }
    spec = {
        "restartPolicy": "Never",
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
    }
    return json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec})


def _get(cluster: ClusterAccess, kind: str, ns: str, name: str = "") -> JSONDict:
    args = ["get", kind, *([name] if name else []), "-o", "json", *(["-n", ns] if ns else [])]
    out = cluster.kubectl(*args, check=False)
    doc: JSONDict = json.loads(out.stdout) if out.returncode == 0 else {}
    return doc


def _until(check: Callable[[], JSONDict | None], timeout: float, what: str) -> JSONDict:
    return wait_until(check, timeout, every=1, what=what)


def _pod_ended(cluster: ClusterAccess, ns: str, name: str) -> JSONDict | None:
    pod = _get(cluster, "pod", ns, name)
    return pod if pod.get("status", {}).get("phase") in ("Succeeded", "Failed") else None


def _waiting(cluster: ClusterAccess, ns: str, name: str) -> JSONDict | None:
    statuses = _get(cluster, "pod", ns, name).get("status", {}).get("containerStatuses") or [{}]
    waiting: JSONDict | None = statuses[0].get("state", {}).get("waiting")
    return waiting


def _status_when(
    cluster: ClusterAccess, kind: str, ns: str, name: str, done: Callable[[JSONDict], bool]
) -> JSONDict | None:
    st: JSONDict = _get(cluster, kind, ns, name).get("status") or {}
    return st if st and done(st) else None


def _images(cluster: ClusterAccess, ns: str) -> set[str]:
    pods = _get(cluster, "pods", ns)["items"]
    return {c["image"] for p in pods for c in p["spec"]["containers"]}


@pytest.mark.timeout(900)
def test_a_pod_runs_from_its_image_with_the_image_python_as_non_root(
    image_cluster: ClusterAccess, built: dict[str, str]
) -> None:
    cluster = image_cluster
    ns = f"probe-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", ns)
    _until(lambda: _get(cluster, "sa", ns, "default") or None, 60, "the default ServiceAccount")
    for name, ref in (("trainer", TRAINER), ("operator", OPERATOR)):
        assert ref in built
        cluster.apply(ns, _pod(name, ref, ["python", "-c", PROBE, str(VENV)]))
    # An image the store lacks waits as ErrImagePull, as a kubelet reports it.
    cluster.apply(ns, _pod("missing", "ghcr.io/medforge/nothing:9.9", ["true"]))
    for name in ("trainer", "operator"):
        pod = _until(functools.partial(_pod_ended, cluster, ns, name), 600, f"pod {name} to end")
        logs = cluster.kubectl("logs", name, "-n", ns).stdout
        assert pod["status"]["phase"] == "Succeeded", logs
        seen = json.loads(logs.strip().splitlines()[-1])
        assert seen["prefix"] == "/opt/medforge" and seen["executable"].startswith("/opt/medforge/")
        assert seen["uid"] == 10001 and seen["gid"] == 10001  # the image's USER
        assert not seen["venv_visible"]  # the project's environment is not in the container
        assert not seen["root_writable"]  # readOnlyRootFilesystem
        assert seen["hf_offline"] == ("1" if name == "trainer" else None)
    waiting = _until(functools.partial(_waiting, cluster, ns, "missing"), 60, "ErrImagePull")
    assert waiting["reason"] == "ErrImagePull" and "make images" in waiting["message"]
    cluster.kubectl("delete", "namespace", ns, "--wait=false")


def _helm(cluster: ClusterAccess, *args: str) -> str:
    helm = binaries.ensure(["helm"], log=False)["helm"]
    out = subprocess.run(
        [str(helm), f"--kubeconfig={cluster.kubeconfig}", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def _namespace(cluster: ClusterAccess, ns: str, *labels: str, secret: str = "") -> None:
    cluster.kubectl("create", "namespace", ns)
    if labels:
        cluster.kubectl("label", "namespace", ns, *labels)
    if secret:
        cluster.kubectl(
            *("-n", ns, "create", "secret", "generic", secret),
            f"--from-literal=AWS_ACCESS_KEY_ID={cluster.s3_access_key}",
            f"--from-literal=AWS_SECRET_ACCESS_KEY={cluster.s3_secret_key}",
        )


def _install(cluster: ClusterAccess, tmp_path: Path, tag: str) -> tuple[Any, str]:
    """The forge store with a tiny base model, and the chart installed as a platform team
    installs it (default images and replicas). Returns (S3 client, base model digest)."""
    system, forge_ns = f"medforge-{tag}", f"forge-{tag}"
    s3 = client(cluster.s3_endpoint, cluster.s3_access_key, cluster.s3_secret_key)
    s3.create_bucket(Bucket=f"forge-{tag}")
    base_dir = tiny_clip(tmp_path / "clip")
    digest = prepare(base_dir)
    for p in sorted(base_dir.iterdir()):
        s3.put_object(
            Bucket=f"forge-{tag}", Key=f"base-models/clip-img/{p.name}", Body=p.read_bytes()
        )
    _namespace(cluster, system, secret="medforge-store")
    _namespace(cluster, forge_ns, "medforge.io/member=true")
    chart = str(ROOT / "helm" / "medforge")
    _helm(
        cluster,
        *("install", "medforge", chart, "-n", system),
        *("--set", f"store.endpoint={cluster.s3_endpoint}", "--set", f"store.bucket=forge-{tag}"),
        *("--set", f"forgeNamespaces={{{forge_ns}}}"),
    )
    return s3, digest


def _composite(tag: str) -> str:
    contributions = {
        "selector": {"matchLabels": {"medforge.io/test": "yes"}},
        "namespaceSelector": {"matchLabels": {"medforge.io/forge": tag}},
    }
    spec = {
        "baseModel": {"name": "clip-img"},
        "contributions": contributions,
        "minContributions": 1,
        "gate": {"maxRegression": 1.0},
    }
    doc = {"apiVersion": "medforge.io/v1alpha1", "kind": "CompositeModel"}
    return json.dumps({**doc, "metadata": {"name": "forge"}, "spec": spec})


@pytest.mark.timeout(2400)
def test_helm_install_of_the_images_trains_and_merges(
    image_cluster: ClusterAccess, built: dict[str, str], tmp_path: Path
) -> None:
    cluster, tag = image_cluster, uuid.uuid4().hex[:6]
    system, forge_ns, hospital = f"medforge-{tag}", f"forge-{tag}", f"hospital-{tag}"
    s3, digest = _install(cluster, tmp_path, tag)
    started = time.monotonic()
    ready = functools.partial(
        _status_when, cluster, "deploy", system, "medforge-operator",
        lambda st: st.get("readyReplicas") == 2,
    )  # fmt: skip
    _until(ready, 300, "two operator replicas ready")
    assert _images(cluster, system) == {OPERATOR}
    base = {
        "apiVersion": "medforge.io/v1alpha1",
        "kind": "BaseModel",
        "metadata": {"name": "clip-img"},
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps({**base, "spec": {"digest": digest}}))
    verified = functools.partial(
        _status_when, cluster, "basemodel", "", "clip-img", lambda st: st.get("phase") == "Ready"
    )
    _until(verified, 300, "BaseModel Ready")
    pods = {p["metadata"]["name"] for p in _get(cluster, "pods", system)["items"]}
    holders = [i["spec"].get("holderIdentity", "") for i in _get(cluster, "lease", system)["items"]]
    assert any(any(p in h for p in pods) for h in holders), holders  # one replica leads

    _namespace(
        cluster,
        hospital,
        "medforge.io/member=true",
        f"medforge.io/forge={tag}",
        secret="imaging-data",
    )
    task, classes, style = INSTITUTIONS[0]
    s3.create_bucket(Bucket=f"{hospital}-imaging")
    data = make_dataset(tmp_path / task, classes, 24, seed=0, style=style)
    for p in sorted(data.rglob("*.png")):
        key = f"{task}/{p.relative_to(data).as_posix()}"
        s3.put_object(Bucket=f"{hospital}-imaging", Key=key, Body=p.read_bytes())
    uri, me = f"s3://{hospital}-imaging/{task}/", f"{forge_ns}/forge"
    cluster.apply(
        hospital,
        contribution_doc(task, classes, ("clip-img", digest), uri, cluster.s3_endpoint, me),
    )
    cluster.apply(forge_ns, _composite(tag))
    trained = functools.partial(
        _status_when, cluster, "lorac", hospital, task,
        lambda st: st.get("phase") in ("Succeeded", "Failed"),
    )  # fmt: skip
    st = _until(trained, 900, "the contribution trained")
    assert st["phase"] == "Succeeded", st
    assert _images(cluster, hospital) == {TRAINER}
    merged = functools.partial(
        _status_when, cluster, "cmodel", forge_ns, "forge",
        lambda st: bool(st.get("history")) and st["history"][0]["state"] in ("Accepted", "Rejected"),
    )  # fmt: skip
    cm = _until(merged, 900, "revision 1")
    assert cm["history"][0]["revision"] == 1 and cm["history"][0]["state"] == "Accepted", cm
    assert _images(cluster, forge_ns) == {MERGER}
    print(
        f"\ncontainer mode: operator ready, trained and merged in {time.monotonic() - started:.0f} s"
    )
    _helm(cluster, "uninstall", "medforge", "-n", system)
