"""The process kubelet: a Node whose pods run as local processes.

It stands in for a kubelet plus a scheduler on a machine without a container runtime:
- registers its Node and keeps its Ready condition fresh;
- binds pending pods to the Node (honouring nodeSelector, a pod budget and GPU count);
- runs each container's command and args as a local process in the project's Python
  environment (or, in container mode, from its image with runc: `containers`), with the env a kubelet resolves (values, Secret and ConfigMap keys, fieldRefs),
  volumes mounted at their mountPath in a private mount namespace, and the termination-message
  file read back into containerStatuses;
- reports CreateContainerConfigError for a missing Secret, ConfigMap or key, then retries;
- reports Running, then Succeeded or Failed with exit codes; honours restartPolicy and
  activeDeadlineSeconds; kills the process when the pod is deleted;
- serves container logs to the API server, so `kubectl logs` works.
The real Job controller does the rest.

Length: one class per kubelet duty (the node, the pod workers, the log server) sharing the
pod's state machine; split apart they would pass that state through every call. It runs only
in the local cluster, never in a product image.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from medforge_localcluster import containers, containerspec, podspec
from medforge_localcluster.kube import ApiError, Kube
from medforge_localcluster.processes import start_ticks

JSON = dict[str, Any]
# A container's command, env and mounts, and in container mode its image and runtime view.
Prepared = tuple[list[str], dict[str, str], list[JSON], "containers.Plan | None"]
VERSION = "v1.35.4-medforge-process"
POLL = 0.2


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


class Kubelet:
    def __init__(self, args: argparse.Namespace) -> None:
        self.node = args.node_name
        self.dir = Path(args.state_dir) / "kubelet"
        self.pods_dir = self.dir / "pods"
        self.running_dir = self.dir / "running"
        self.pvc_dir = self.dir / "pvc"
        for d in (self.pods_dir, self.running_dir, self.pvc_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.port = int(args.port)
        self.api_server = args.api_server
        self.pki = Path(args.state_dir) / "pki"
        self.max_pods = int(os.environ.get("MEDFORGE_KUBELET_MAX_PODS", "16"))
        self.gpus = int(os.environ.get("MEDFORGE_KUBELET_GPUS", "0"))
        self.labels = {
            "kubernetes.io/hostname": self.node,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "node.kubernetes.io/instance-type": "medforge-process",
        }
        for pair in filter(None, os.environ.get("MEDFORGE_KUBELET_NODE_LABELS", "").split(",")):
            k, _, v = pair.partition("=")
            self.labels[k.strip()] = v.strip()
        self.kube = Kube.from_kubeconfig(Path(args.kubeconfig), pool_size=64)
        self.lock = threading.Lock()
        self.pods: dict[str, JSON] = {}  # uid -> latest pod seen
        self.runners: dict[str, PodRunner] = {}
        self.binding: set[str] = set()
        self.unschedulable_noted: dict[str, str] = {}
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.bin_dir = str(Path(sys.executable).parent)
        api_port = int(self.api_server.rsplit(":", 1)[1])
        self.runtime = containers.Runtime.from_env(self.dir, os.environ, api_port)

    # ----- node -----
    def register(self) -> None:
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.node, "labels": self.labels},
        }
        try:
            self.kube.post("/api/v1/nodes", node)
        except ApiError as exc:
            if exc.status != 409:
                raise
            self.kube.patch(f"/api/v1/nodes/{self.node}", {"metadata": {"labels": self.labels}})
        self.heartbeat()

    def heartbeat(self) -> None:
        t = podspec.now()
        capacity = {
            "cpu": str(os.cpu_count() or 1),
            "memory": f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 1024}Ki",
            "pods": str(self.max_pods),
            "nvidia.com/gpu": str(self.gpus),
        }

        def cond(ctype: str, status: str, reason: str, message: str) -> JSON:
            return {
                "type": ctype,
                "status": status,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": t,
                "lastTransitionTime": t,
            }

        status = {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "ok"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "ok"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "ok"),
                cond("Ready", "True", "KubeletReady", "process kubelet is posting ready status"),
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.node},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.port}},
            "nodeInfo": {
                "machineID": "medforge-local",
                "systemUUID": "medforge-local",
                "bootID": "medforge-local",
                "kernelVersion": platform.release(),
                "osImage": "local processes",
                "containerRuntimeVersion": "process://medforge",
                "kubeletVersion": VERSION,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }
        self.kube.patch(f"/api/v1/nodes/{self.node}/status", {"status": status})

    def heartbeat_loop(self) -> None:
        while not self.stopping.wait(20):
            try:
                self.heartbeat()
            except Exception as exc:
                log(f"heartbeat failed: {exc}")

    # ----- events -----
    def event(self, pod: JSON, etype: str, reason: str, message: str) -> None:
        meta = pod["metadata"]
        t = podspec.now()
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "type": etype,
            "reason": reason,
            "message": message,
            "source": {"component": "kubelet", "host": self.node},
            "firstTimestamp": t,
            "lastTimestamp": t,
            "count": 1,
        }
        try:
            self.kube.post(f"/api/v1/namespaces/{meta['namespace']}/events", body)
        except ApiError as exc:
            if exc.status != 404:  # the namespace is going away: nobody will read it
                log(f"event {reason} for {meta['namespace']}/{meta['name']} failed: {exc}")

    # ----- watching pods -----
    def watch_loop(self) -> None:
        rv = ""
        while not self.stopping.is_set():
            try:
                if not rv:
                    rv = self.relist()
                for ev in self.kube.watch("/api/v1/pods", rv, timeout_seconds=240):
                    if self.stopping.is_set():
                        return
                    obj = ev["object"]
                    if ev["type"] == "ERROR":
                        rv = ""  # 410 Gone: the resource version is too old; list again
                        break
                    rv = obj["metadata"]["resourceVersion"]
                    if ev["type"] == "BOOKMARK":
                        continue
                    self.observe(obj, deleted=ev["type"] == "DELETED")
            except Exception as exc:
                if self.stopping.is_set():
                    return
                log(f"pod watch broke ({exc}); listing again")
                rv = ""
                time.sleep(1)

    def relist(self) -> str:
        listing = self.kube.get("/api/v1/pods")
        seen = set()
        for pod in listing.get("items", []):
            seen.add(pod["metadata"]["uid"])
            self.observe(pod, deleted=False)
        with self.lock:
            gone = [uid for uid in self.pods if uid not in seen]
        for uid in gone:
            self.observe(self.pods[uid], deleted=True)
        return str(listing["metadata"]["resourceVersion"])

    def observe(self, pod: JSON, deleted: bool) -> None:
        uid = pod["metadata"]["uid"]
        with self.lock:
            if deleted:
                self.pods.pop(uid, None)
                self.binding.discard(uid)
                self.unschedulable_noted.pop(uid, None)
            else:
                self.pods[uid] = pod
            runner = self.runners.get(uid)
        if runner is not None:
            runner.update(pod, deleted)
            return
        if deleted:
            shutil.rmtree(self.pods_dir / uid, ignore_errors=True)
            return
        spec = pod.get("spec", {})
        if not spec.get("nodeName"):
            self.wake.set()
            return
        if spec["nodeName"] != self.node:
            return
        deleting = bool(pod["metadata"].get("deletionTimestamp"))
        if podspec.is_terminal(pod):
            if deleting:
                self.finalize_delete(pod)
            return
        started_before = any(
            "running" in (cs.get("state") or {})
            for cs in pod.get("status", {}).get("containerStatuses") or []
        )
        if started_before:
            # Its process died with an earlier kubelet: say so rather than pretend it runs.
            self.fail_orphan(pod)
            return
        if deleting:
            self.finalize_delete(pod)
            return
        runner = PodRunner(self, pod)
        with self.lock:
            if uid in self.runners:
                return
            self.runners[uid] = runner
        runner.start()

    def runner_done(self, uid: str) -> None:
        with self.lock:
            self.runners.pop(uid, None)
        self.wake.set()  # a slot is free: bind the next pending pod

    def finalize_delete(self, pod: JSON) -> None:
        meta = pod["metadata"]
        with contextlib.suppress(ApiError):
            self.kube.delete(
                f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                {"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}},
            )

    def fail_orphan(self, pod: JSON) -> None:
        meta = pod["metadata"]
        t = podspec.now()
        statuses = []
        for c in pod["spec"]["containers"]:
            state = podspec.terminated_state(
                137,
                t,
                t,
                "the process kubelet restarted while this container ran",
                reason="ContainerStatusUnknown",
            )
            statuses.append(podspec.terminated_status(c, state, 0))
        body = {
            "status": {
                "phase": "Failed",
                "containerStatuses": statuses,
                "conditions": podspec.pod_conditions("Failed", False, t),
            }
        }
        with contextlib.suppress(ApiError):
            self.kube.patch(
                f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status", body
            )

    # ----- scheduling -----
    def schedule_loop(self) -> None:
        while not self.stopping.is_set():
            self.wake.wait(2)
            self.wake.clear()
            try:
                self.schedule()
            except Exception as exc:
                log(f"scheduling failed: {exc}")

    def schedule(self) -> None:
        with self.lock:
            pods = list(self.pods.values())
            binding = set(self.binding)
        mine = [
            p for p in pods if p["spec"].get("nodeName") == self.node and not podspec.is_terminal(p)
        ]
        used = len(mine) + len(binding)
        used_gpus = sum(podspec.gpu_request(p) for p in mine)
        pending = sorted(
            (
                p
                for p in pods
                if not p["spec"].get("nodeName")
                and p["spec"].get("schedulerName", "default-scheduler") == "default-scheduler"
                and not p["metadata"].get("deletionTimestamp")
                and p["metadata"]["uid"] not in binding
                and not podspec.is_terminal(p)
            ),
            key=lambda p: p["metadata"].get("creationTimestamp", ""),
        )
        for pod in pending:
            if used >= self.max_pods:
                return  # full: the watch wakes us when a pod ends
            reason = podspec.unschedulable_reason(pod, self.labels, self.gpus, used_gpus)
            if reason:
                self.note_unschedulable(pod, reason)
                continue
            self.bind(pod)
            used += 1
            used_gpus += podspec.gpu_request(pod)

    def bind(self, pod: JSON) -> None:
        meta = pod["metadata"]
        with self.lock:
            self.binding.add(meta["uid"])
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"]},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.node},
        }
        try:
            self.kube.post(
                f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/binding", body
            )
            self.event(
                pod,
                "Normal",
                "Scheduled",
                f"Successfully assigned {meta['namespace']}/{meta['name']} to {self.node}",
            )
        except ApiError as exc:
            if exc.status not in (404, 409):
                log(f"binding {meta['namespace']}/{meta['name']} failed: {exc}")
        finally:
            with self.lock:
                self.binding.discard(meta["uid"])

    def note_unschedulable(self, pod: JSON, reason: str) -> None:
        meta = pod["metadata"]
        if self.unschedulable_noted.get(meta["uid"]) == reason:
            return
        self.unschedulable_noted[meta["uid"]] = reason
        cond = {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": reason,
            "lastTransitionTime": podspec.now(),
            "lastProbeTime": None,
        }
        with contextlib.suppress(ApiError):
            self.kube.patch(
                f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status",
                {"status": {"conditions": [cond]}},
            )
        self.event(pod, "Warning", "FailedScheduling", reason)

    # ----- logs -----
    def log_file(self, ns: str, name: str, container: str) -> Path | None:
        with self.lock:
            for uid, pod in self.pods.items():
                if pod["metadata"]["namespace"] == ns and pod["metadata"]["name"] == name:
                    path = self.pods_dir / uid / f"{container}.log"
                    return path if path.exists() else None
        return None

    def serve_logs(self) -> ThreadingHTTPServer:
        kubelet = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, _format: str, *_args: Any) -> None:
                return

            def do_GET(self) -> None:
                url = urlparse(self.path)
                parts = url.path.strip("/").split("/")
                if len(parts) != 4 or parts[0] != "containerLogs":
                    self.send_error(404, "only /containerLogs/{ns}/{pod}/{container} is served")
                    return
                q = {k: v[-1] for k, v in parse_qs(url.query).items()}
                path = kubelet.log_file(parts[1], parts[2], parts[3])
                if path is None:
                    self.send_error(404, f"no log for container {parts[3]} of {parts[2]}")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                data = path.read_bytes()
                if "tailLines" in q:
                    data = b"".join(data.splitlines(keepends=True)[-int(q["tailLines"]) :])
                if "limitBytes" in q:
                    data = data[: int(q["limitBytes"])]
                self.wfile.write(data)
                if q.get("follow") == "true":
                    self._follow(path, len(path.read_bytes()), parts)

            def _follow(self, path: Path, offset: int, parts: list[str]) -> None:
                with path.open("rb") as f:
                    f.seek(offset)
                    while not kubelet.stopping.is_set():
                        chunk = f.read(65536)
                        if chunk:
                            self.wfile.write(chunk)
                            self.wfile.flush()
                            continue
                        if not kubelet.container_running(parts[1], parts[2]):
                            return
                        time.sleep(0.3)

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(str(self.pki / "kubelet.crt"), str(self.pki / "kubelet.key"))
        ctx.verify_mode = ssl.CERT_REQUIRED  # only the API server's client certificate
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="logs", daemon=True).start()
        return server

    def container_running(self, ns: str, name: str) -> bool:
        with self.lock:
            return any(
                r.pod["metadata"]["namespace"] == ns and r.pod["metadata"]["name"] == name
                for r in self.runners.values()
            )

    # ----- main -----
    def run(self) -> None:
        self.register()
        server = self.serve_logs()
        threads = [
            threading.Thread(target=self.watch_loop, name="watch", daemon=True),
            threading.Thread(target=self.schedule_loop, name="schedule", daemon=True),
            threading.Thread(target=self.heartbeat_loop, name="heartbeat", daemon=True),
        ]
        for t in threads:
            t.start()
        log(f"process kubelet {self.node} up: max {self.max_pods} pods, {self.gpus} GPUs")
        self.stopping.wait()
        server.shutdown()
        with self.lock:
            runners = list(self.runners.values())
        for r in runners:
            r.kill_all(signal.SIGKILL)
        log("process kubelet stopped")


class PodRunner(threading.Thread):
    """Runs one pod's containers to the end and reports on them."""

    def __init__(self, kubelet: Kubelet, pod: JSON) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.k = kubelet
        self.pod = pod
        self.uid = meta["uid"]
        self.ns = meta["namespace"]
        self.pod_name = meta["name"]
        self.dir = kubelet.pods_dir / self.uid
        self.stop_requested = threading.Event()
        self.deleted = False
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.netns: tuple[subprocess.Popen[bytes], str] | None = None  # container mode
        self.reported_waiting: dict[str, str] = {}
        self.start_time = podspec.now()

    @property
    def status_path(self) -> str:
        return f"/api/v1/namespaces/{self.ns}/pods/{self.pod_name}/status"

    def update(self, pod: JSON, deleted: bool) -> None:
        self.pod = pod
        if deleted or pod["metadata"].get("deletionTimestamp"):
            self.deleted = self.deleted or deleted
            self.stop_requested.set()

    def patch_status(self, status: JSON) -> None:
        try:
            self.k.kube.patch(self.status_path, {"status": status})
        except ApiError as exc:
            if exc.status != 404:
                log(f"status of {self.ns}/{self.pod_name}: {exc}")

    # ----- lookups for env and volumes -----
    def _lookup(self, kind: str, name: str) -> JSON | None:
        plural = "secrets" if kind == "Secret" else "configmaps"
        try:
            return self.k.kube.get(f"/api/v1/namespaces/{self.ns}/{plural}/{name}")
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:
            log(f"pod {self.ns}/{self.pod_name} failed in the kubelet: {exc!r}")
            self.kill_all(signal.SIGKILL)
        finally:
            self._cleanup()
            self.k.runner_done(self.uid)

    def _run(self) -> None:
        spec = self.pod["spec"]
        self.dir.mkdir(parents=True, exist_ok=True)
        prepared = self._prepare()
        if prepared is None:  # deleted while it waited for its configuration
            self.k.finalize_delete(self.pod)
            return
        codes: dict[str, int] = {}
        for init in spec.get("initContainers") or []:
            result = self._run_containers([init], prepared, init=True)
            if result is None:
                self.k.finalize_delete(self.pod)
                return
            codes.update(result)
            if any(codes.values()):
                break
        if not any(codes.values()):
            result = self._run_containers(spec["containers"], prepared, init=False)
            if result is None:
                self.k.finalize_delete(self.pod)
                return
            codes.update(result)
        if self.pod["metadata"].get("deletionTimestamp"):
            self.k.finalize_delete(self.pod)

    def _prepare(self) -> dict[str, Prepared] | None:
        """Resolve env, command and mounts of every container (and, in container mode, its
        image); wait while a Secret or the image is missing."""
        spec = self.pod["spec"]
        containers = [*(spec.get("initContainers") or []), *spec["containers"]]
        while True:
            try:
                volumes = self._volumes()
                out = {}
                for c in containers:
                    env = podspec.resolve_env(self.pod, c, self._lookup)
                    plan = self.k.runtime.plan(self.pod, c, env) if self.k.runtime else None
                    argv = plan.spec.argv if plan else podspec.command_argv(c, env)
                    out[c["name"]] = (argv, env, self._mounts(c, volumes), plan)
                return out
            except podspec.ConfigError as exc:
                reason = getattr(exc, "reason", "CreateContainerConfigError")
                self._report_config_error(containers, str(exc), reason)
            if self.stop_requested.wait(3):
                return None

    def _report_config_error(
        self, containers: list[JSON], message: str, reason: str = "CreateContainerConfigError"
    ) -> None:
        if all(self.reported_waiting.get(c["name"]) == message for c in containers):
            return
        for c in containers:
            self.reported_waiting[c["name"]] = message
        statuses = [
            podspec.waiting_status(c, reason, message) for c in self.pod["spec"]["containers"]
        ]
        self.patch_status(
            {
                "phase": "Pending",
                "hostIP": "127.0.0.1",
                "startTime": self.start_time,
                "containerStatuses": statuses,
                "conditions": podspec.pod_conditions("Pending", False, podspec.now()),
            }
        )
        self.k.event(self.pod, "Warning", "Failed", f"Error: {message}")

    def _volumes(self) -> dict[str, Path]:
        """Materialise each volume in the pod's directory (or find its host path)."""
        vols: dict[str, Path] = {}
        for v in self.pod["spec"].get("volumes") or []:
            name = v["name"]
            path = self.dir / "volumes" / name
            if "hostPath" in v:
                vols[name] = Path(v["hostPath"]["path"])
                continue
            if "persistentVolumeClaim" in v:
                claim = v["persistentVolumeClaim"]["claimName"]
                path = self.k.pvc_dir / self.ns / claim
                path.mkdir(parents=True, exist_ok=True)
                vols[name] = path
                continue
            path.mkdir(parents=True, exist_ok=True)
            if "emptyDir" in v:
                path.chmod(0o777)  # as a kubelet makes it: writable by the pod's non-root user
            if "secret" in v:
                self._write_keys(path, "Secret", v["secret"].get("secretName", ""), v["secret"])
            elif "configMap" in v:
                self._write_keys(path, "ConfigMap", v["configMap"]["name"], v["configMap"])
            elif "projected" in v:
                for src in v["projected"].get("sources") or []:
                    self._write_projection(path, src)
            elif "downwardAPI" in v:
                self._write_projection(path, {"downwardAPI": v["downwardAPI"]})
            vols[name] = path
        return vols

    def _write_keys(self, path: Path, kind: str, name: str, ref: JSON) -> None:
        obj = self._lookup(kind, name)
        if obj is None:
            if ref.get("optional"):
                return
            raise podspec.ConfigError(f'{kind.lower()} "{name}" not found')
        data = (
            {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
            if (kind == "Secret")
            else {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        )
        items = ref.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            if item["key"] not in data:
                raise podspec.ConfigError(
                    f"couldn't find key {item['key']} in {kind} {self.ns}/{name}"
                )
            target = path / item["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data[item["key"]])
            target.chmod(int(item.get("mode", ref.get("defaultMode", 0o644))))
            self._fs_group(target)

    def _fs_group(self, path: Path) -> None:
        """Give the pod's fsGroup the file, as a kubelet does: a 0440 Secret stays readable by
        a non-root container in that group."""
        group = (self.pod["spec"].get("securityContext") or {}).get("fsGroup")
        if group is not None:
            os.chown(path, -1, int(group))

    def _write_projection(self, path: Path, src: JSON) -> None:
        if "serviceAccountToken" in src:
            sat = src["serviceAccountToken"]
            sa = self.pod["spec"].get("serviceAccountName", "default")
            req = {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {
                    "audiences": [sat["audience"]] if sat.get("audience") else None,
                    "expirationSeconds": int(sat.get("expirationSeconds", 3607)),
                    "boundObjectRef": {
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "name": self.pod_name,
                        "uid": self.uid,
                    },
                },
            }
            tok = self.k.kube.post(f"/api/v1/namespaces/{self.ns}/serviceaccounts/{sa}/token", req)
            (path / sat["path"]).write_text(tok["status"]["token"])
            self._fs_group(path / sat["path"])
        elif "configMap" in src:
            self._write_keys(path, "ConfigMap", src["configMap"]["name"], src["configMap"])
        elif "secret" in src:
            self._write_keys(path, "Secret", src["secret"]["name"], src["secret"])
        elif "downwardAPI" in src:
            for item in src["downwardAPI"].get("items") or []:
                if "fieldRef" in item:
                    env = podspec.resolve_env(
                        self.pod,
                        {"env": [{"name": "v", "valueFrom": {"fieldRef": item["fieldRef"]}}]},
                        self._lookup,
                    )
                    (path / item["path"]).write_text(env["v"])

    def _mounts(self, c: JSON, volumes: dict[str, Path]) -> list[JSON]:
        mounts = []
        for vm in c.get("volumeMounts") or []:
            if vm["name"] not in volumes:
                raise podspec.ConfigError(f"volume {vm['name']!r} is not defined in the pod")
            source = volumes[vm["name"]]
            if vm.get("subPath"):
                source = source / vm["subPath"]
                source.mkdir(parents=True, exist_ok=True)
            mounts.append(
                {
                    "source": str(source),
                    "target": vm["mountPath"],
                    "readOnly": bool(vm.get("readOnly")),
                }
            )
        return mounts

    # ----- running -----
    def _spawn(
        self, c: JSON, argv: list[str], env: dict[str, str], mounts: list[JSON], plan: Any = None
    ) -> tuple[subprocess.Popen[bytes], Path]:
        cdir = self.dir / c["name"]
        cdir.mkdir(parents=True, exist_ok=True)
        term = cdir / "termination-log"
        term.write_bytes(b"")
        term_target = c.get("terminationMessagePath") or podspec.DEFAULT_TERMINATION_PATH
        if plan is not None:
            return self._spawn_container(c, plan, env, mounts, term, term_target), term
        full_env = {
            "PATH": f"{self.k.bin_dir}:/usr/local/bin:/usr/bin:/bin",
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": "C.UTF-8",
            "HOSTNAME": self.pod_name,
            "PYTHONUNBUFFERED": "1",
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": self.k.api_server.rsplit(":", 1)[1],
            **env,
        }
        exec_spec = {
            "argv": argv,
            "env": full_env,
            "mounts": [*mounts, {"source": str(term), "target": term_target}],
            "workingDir": c.get("workingDir"),
            "defaultWorkingDir": str(cdir),
            "terminationMessagePath": term_target,
            "createdLog": str(self.k.dir / "created-mountpoints"),
        }
        spec_path = cdir / "exec.json"
        spec_path.write_text(json.dumps(exec_spec))
        spec_path.chmod(0o600)
        unshare = shutil.which("unshare") or "unshare"
        with (self.dir / f"{c['name']}.log").open("ab") as logf:
            proc = subprocess.Popen(
                [
                    unshare,
                    "--mount",
                    "--propagation",
                    "private",
                    sys.executable,
                    "-m",
                    "medforge_localcluster.podexec",
                    str(spec_path),
                ],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=cdir,
            )
        self._record(c["name"], proc.pid)
        return proc, term

    def _record(self, name: str, pid: int, **extra: str) -> None:
        """What `localcluster down` needs to end this process if the kubelet cannot."""
        record = {"pid": pid, "start_ticks": start_ticks(pid), **extra}
        (self.k.running_dir / f"{self.uid}-{name}.json").write_text(json.dumps(record))

    def _spawn_container(
        self,
        c: JSON,
        plan: containers.Plan,
        env: dict[str, str],
        mounts: list[JSON],
        term: Path,
        term_target: str,
    ) -> subprocess.Popen[bytes]:
        """Start container `c` from its image with runc, in the pod's network namespace."""
        runtime = self.k.runtime
        if runtime is None:
            raise RuntimeError("a container plan without container mode")
        term.chmod(0o666)  # the container's user writes its termination message
        if self.netns is None:
            self.netns = runtime.pod_network(self.dir)
            self._record("netns", self.netns[0].pid)
        cluster_env = {
            "HOSTNAME": self.pod_name,
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": self.k.api_server.rsplit(":", 1)[1],
        }
        spec = dataclasses.replace(plan.spec, env={**plan.spec.env, **cluster_env, **env})
        binds = [containerspec.Mount(m["source"], m["target"], m["readOnly"]) for m in mounts]
        binds.append(containerspec.Mount(str(term), term_target))
        cid, bundle = f"{self.uid}-{c['name']}", self.dir / c["name"] / "bundle"
        argv = runtime.bundle(
            dataclasses.replace(plan, spec=spec), bundle, cid, self.pod_name, self.netns[1], binds
        )
        with (self.dir / f"{c['name']}.log").open("ab") as logf:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.dir,
            )
        self._record(c["name"], proc.pid, runc=cid, runcRoot=str(runtime.state), bundle=str(bundle))
        return proc

    def kill_all(self, sig: int) -> None:
        if self.k.runtime is not None:
            for name, proc in self.procs.items():
                if proc.poll() is None:  # runc forwards SIGTERM, not SIGKILL: ask it directly
                    self.k.runtime.kill(f"{self.uid}-{name}", sig)
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)

    def _deadline(self) -> float | None:
        secs = self.pod["spec"].get("activeDeadlineSeconds")
        if secs is None:
            return None
        started = podspec.parse_time(self.start_time).timestamp()
        return started + int(secs)

    def _exit_state(self, c: JSON, returncode: int, term: Path, started: str) -> tuple[int, JSON]:
        """(exit code, terminated state) of a container that ended, with its termination
        message as the kubelet writes it (the file, or the log's tail on failure)."""
        code = podspec.exit_code(returncode)
        message = podspec.termination_message(
            term.read_bytes(),
            c.get("terminationMessagePolicy", "File"),
            code != 0,
            _tail(self.dir / f"{c['name']}.log"),
        )
        return code, podspec.terminated_state(code, started, podspec.now(), message)

    def _kill_if_due(self, killed: str, deadline: float | None, started: dict[str, str]) -> str:
        """Stop the containers once the pod is deleted or past its deadline; returns why they
        were stopped ("" while they run on)."""
        if self.stop_requested.wait(POLL) and not killed:
            self.k.event(self.pod, "Normal", "Killing", f"Stopping container {', '.join(started)}")
            self._terminate()
            return "Killing"
        if deadline is not None and time.time() > deadline and not killed:
            self._terminate(grace=0)
            return "DeadlineExceeded"
        return killed

    def _run_containers(
        self, containers: list[JSON], prepared: dict[str, Any], init: bool
    ) -> dict[str, int] | None:
        """Run the containers until they end for good; returns their exit codes, or None when
        the pod was deleted."""
        policy = self.pod["spec"].get("restartPolicy", "Always")
        restarts = {c["name"]: 0 for c in containers}
        started: dict[str, str] = {}
        last_state: dict[str, JSON] = {}
        final: dict[str, JSON] = {}
        codes: dict[str, int] = {}
        terms: dict[str, Path] = {}

        def start(c: JSON) -> None:
            argv, env, mounts, plan = prepared[c["name"]]
            proc, term = self._spawn(c, argv, env, mounts, plan)
            self.procs[c["name"]] = proc
            terms[c["name"]] = term
            started[c["name"]] = podspec.now()

        for c in containers:
            start(c)
            self.k.event(self.pod, "Normal", "Started", f"Started container {c['name']}")
        self._report(containers, started, final, restarts, last_state, init)
        deadline = self._deadline()
        killed_reason = ""
        while len(final) < len(containers):
            killed_reason = self._kill_if_due(killed_reason, deadline, started)
            for c in containers:
                name = c["name"]
                proc = self.procs[name]
                if name in final or proc.poll() is None:
                    continue
                code, state = self._exit_state(c, proc.returncode, terms[name], started[name])
                restart = not killed_reason and (
                    policy == "Always" or (policy == "OnFailure" and code != 0)
                )
                if restart and not init:
                    restarts[name] += 1
                    last_state[name] = state
                    time.sleep(min(10.0, 0.5 * 2 ** min(restarts[name], 5)))
                    start(c)
                    self._report(containers, started, final, restarts, last_state, init)
                    continue
                if restart and init and code != 0:
                    restarts[name] += 1
                    start(c)
                    continue
                final[name] = state
                codes[name] = code
                (self.k.running_dir / f"{self.uid}-{name}.json").unlink(missing_ok=True)
        if self.deleted:
            return None
        pod_reason = "DeadlineExceeded" if killed_reason == "DeadlineExceeded" else ""
        self._report(containers, started, final, restarts, last_state, init, pod_reason)
        if killed_reason == "Killing" and self.pod["metadata"].get("deletionTimestamp"):
            return None
        return codes

    def _terminate(self, grace: float | None = None) -> None:
        if grace is None:
            meta = self.pod["metadata"]
            grace = float(
                meta.get(
                    "deletionGracePeriodSeconds",
                    self.pod["spec"].get("terminationGracePeriodSeconds", 30),
                )
            )
        self.kill_all(signal.SIGTERM)
        end = time.monotonic() + grace
        while time.monotonic() < end and any(p.poll() is None for p in self.procs.values()):
            time.sleep(POLL)
        self.kill_all(signal.SIGKILL)
        for p in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)

    def _report(
        self,
        containers: list[JSON],
        started: dict[str, str],
        final: dict[str, JSON],
        restarts: dict[str, int],
        last_state: dict[str, JSON],
        init: bool,
        pod_reason: str = "",
    ) -> None:
        statuses = []
        for c in containers:
            name = c["name"]
            pid = self.procs[name].pid
            if name in final:
                statuses.append(podspec.terminated_status(c, final[name], pid, restarts[name]))
            else:
                statuses.append(
                    podspec.running_status(
                        c, started[name], pid, restarts[name], last_state.get(name)
                    )
                )
        done = len(final) == len(containers)
        key = "initContainerStatuses" if init else "containerStatuses"
        status: JSON = {
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": self.start_time,
            key: statuses,
        }
        codes = [s["state"]["terminated"]["exitCode"] for s in statuses if done]
        if init:
            if done and any(codes):
                status["phase"] = "Failed"
                status["conditions"] = podspec.pod_conditions("Failed", False, podspec.now())
            else:
                status["phase"] = "Pending"
        elif done:
            phase = podspec.pod_phase(codes)
            if pod_reason:
                phase = "Failed"
                status["reason"] = pod_reason
                status["message"] = "Pod was active on the node longer than the specified deadline"
            status["phase"] = phase
            status["conditions"] = podspec.pod_conditions(phase, False, podspec.now())
        else:
            status["phase"] = "Running"
            status["conditions"] = podspec.pod_conditions("Running", True, podspec.now())
        self.patch_status(status)

    def _cleanup(self) -> None:
        runtime = self.k.runtime
        for name in list(self.procs):
            if runtime is not None:
                runtime.release(self.dir / name / "bundle", f"{self.uid}-{name}")
            (self.k.running_dir / f"{self.uid}-{name}.json").unlink(missing_ok=True)
        if self.netns is not None:
            self.netns[0].terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.netns[0].wait(5)
            (self.k.running_dir / f"{self.uid}-netns.json").unlink(missing_ok=True)
        # Logs stay while the pod object exists (kubectl logs); a finished pod keeps
        # only its log files, the volumes go.
        shutil.rmtree(self.dir / "volumes", ignore_errors=True)


def _tail(path: Path, size: int = 8192) -> bytes:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read()
    except OSError:
        return b""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--node-name", required=True)
    parser.add_argument("--port", required=True)
    parser.add_argument("--api-server", required=True)
    kubelet = Kubelet(parser.parse_args())

    def on_signal(_signum: int, _frame: Any) -> None:
        kubelet.stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    kubelet.run()


if __name__ == "__main__":
    main()
