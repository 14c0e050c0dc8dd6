"""The local control plane: etcd, kube-apiserver, kube-controller-manager, the process kubelet
and the S3 server, all on 127.0.0.1, all state under one directory.

Layout of the state directory::

    state.json            ports and the records of the running processes
    pki/                  CA, serving and client certificates, service-account key, tokens
    kubeconfig            the admin kubeconfig that kubectl and the tests use
    *.kubeconfig          one per component
    etcd/  s3/  kubelet/  data of etcd, of the S3 server and of the pods
    logs/                 one log per process
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from medforge_localcluster import binaries, commands, pki
from medforge_localcluster.clusterstate import State, default_state_dir, kubeconfig_doc
from medforge_localcluster.containers import release_container
from medforge_localcluster.errors import SetupError
from medforge_localcluster.processes import (
    ProcessRecord,
    alive,
    free_port,
    port_free,
    spawn,
    stop,
    wait_for,
)

NODE_NAME = "medforge-local"
# Stopped in reverse order; the kubelet goes first so that it can end the pods it runs.
ORDER = ("etcd", "kube-apiserver", "kube-controller-manager", "kubelet", "s3")
PORT_NAMES = ("etcd", "etcd-peer", "apiserver", "controller-manager", "kubelet", "s3")
MANIFESTS = Path(__file__).resolve().parent / "manifests"
DEFAULT_BUCKET = "medforge"


class LocalCluster:
    """Drives one local cluster whose state lives in `state_dir`."""

    def __init__(self, state_dir: Path | None = None) -> None:
        self.dir = (state_dir or default_state_dir()).resolve()
        self.pki = self.dir / "pki"
        self.logs = self.dir / "logs"
        self.state_path = self.dir / "state.json"

    # ----- paths and settings other code reads -----
    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    def state(self) -> State:
        return State.load(self.state_path)

    def api_server(self) -> str:
        return f"https://127.0.0.1:{self.state().ports['apiserver']}"

    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.state().ports['s3']}"

    def s3_credentials(self) -> dict[str, str]:
        data: dict[str, str] = json.loads((self.dir / "s3" / "credentials.json").read_text())
        return data

    def env(self) -> dict[str, str]:
        """Variables that point kubectl, the Kubernetes client and boto3 at this cluster."""
        creds = self.s3_credentials()
        return {
            "KUBECONFIG": str(self.kubeconfig),
            "MEDFORGE_S3_ENDPOINT": self.s3_endpoint(),
            "MEDFORGE_S3_BUCKET": DEFAULT_BUCKET,
            "AWS_ENDPOINT_URL": self.s3_endpoint(),
            "AWS_ACCESS_KEY_ID": creds["access_key"],
            "AWS_SECRET_ACCESS_KEY": creds["secret_key"],
            "AWS_DEFAULT_REGION": "us-east-1",
            "PATH": f"{self.kubectl().parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    def kubectl(self) -> Path:
        path = binaries.find("kubectl")
        if path is None:
            raise SetupError("kubectl is not built yet", hint="run `medforge localcluster up`")
        return path

    # ----- status -----
    def running(self) -> dict[str, bool]:
        st = self.state()
        return {name: name in st.processes and alive(st.processes[name]) for name in ORDER}

    def healthy(self) -> bool:
        if not all(self.running().values()):
            return False
        try:
            return self._apiserver_ready()
        except Exception:
            return False

    # ----- up -----
    def up(self, log: bool = True) -> None:
        """Start whatever is not running; a second call on a healthy cluster does nothing."""
        if self.healthy():
            if log:
                print(f"local cluster already up (state in {self.dir})")
            return
        t0 = time.monotonic()
        paths = binaries.ensure(log=log)
        # Start from a clean slate of processes but keep the data: a half-up cluster is
        # restarted whole, since components hold connections to each other.
        self._stop_processes()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        pki.ensure_pki(self.pki)
        st = self.state()
        for name in PORT_NAMES:
            if name not in st.ports or not port_free(st.ports[name]):
                st.ports[name] = free_port()
        st.processes = {}
        st.save(self.state_path)
        self._write_kubeconfigs(st)
        try:
            self._start_etcd(st, paths["etcd"])
            self._start_apiserver(st, paths["kube-apiserver"])
            self._bootstrap(paths["kubectl"])
            self._start_controller_manager(st, paths["kube-controller-manager"])
            self._start_s3(st, paths["versitygw"])
            self._start_kubelet(st)
            self._wait_settled()
        except BaseException:
            self._stop_processes()
            raise
        if log:
            print(f"local cluster up in {time.monotonic() - t0:.1f} s (state in {self.dir})")

    # ----- faults, for the fault-injection tests -----
    def stop_s3(self) -> None:
        """Stop the S3 server (its data stays): the store goes away as in an outage."""
        st = self.state()
        rec = st.processes.pop("s3", None)
        if rec is not None and alive(rec):
            stop(rec, timeout=15)
        st.save(self.state_path)

    def start_s3(self) -> None:
        """Start the S3 server again on its port, with its data and credentials."""
        self._start_s3(self.state(), binaries.ensure(["versitygw"], log=False)["versitygw"])

    def _record(self, st: State, rec: ProcessRecord) -> None:
        st.processes[rec.name] = rec
        st.save(self.state_path)

    def _write_kubeconfigs(self, st: State) -> None:
        server = f"https://127.0.0.1:{st.ports['apiserver']}"
        for ident, filename in (
            ("admin", "kubeconfig"),
            ("controller-manager", "controller-manager.kubeconfig"),
            ("kubelet", "kubelet.kubeconfig"),
        ):
            cfg = kubeconfig_doc(server, self.pki / "ca.crt", pki.token(self.pki, ident), ident)
            path = self.dir / filename
            path.write_text(yaml.safe_dump(cfg))
            path.chmod(0o600)

    def _start_etcd(self, st: State, etcd: Path) -> None:
        client = f"http://127.0.0.1:{st.ports['etcd']}"
        peer = f"http://127.0.0.1:{st.ports['etcd-peer']}"
        argv = commands.etcd(etcd, self.dir, client, peer)
        log = self.logs / "etcd.log"
        rec = spawn("etcd", argv, log)
        self._record(st, rec)

        def ok() -> bool:
            with urllib.request.urlopen(f"{client}/health", timeout=2) as r:  # noqa: S310
                return bool(json.loads(r.read()).get("health") == "true")

        wait_for("etcd", ok, 60, rec, log)

    def _start_apiserver(self, st: State, apiserver: Path) -> None:
        argv = commands.apiserver(apiserver, self.pki, st.ports)
        log = self.logs / "kube-apiserver.log"
        rec = spawn("kube-apiserver", argv, log)
        self._record(st, rec)
        wait_for("kube-apiserver", self._apiserver_ready, 120, rec, log)

    def _ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.pki / "ca.crt"))

    def _apiserver_ready(self) -> bool:
        req = urllib.request.Request(  # noqa: S310 - https to our own loopback server
            f"{self.api_server()}/readyz",
            headers={"Authorization": f"Bearer {pki.token(self.pki, 'admin')}"},
        )
        with urllib.request.urlopen(req, timeout=3, context=self._ssl_context()) as r:  # noqa: S310
            return bool(r.status == 200)

    def _bootstrap(self, kubectl: Path) -> None:
        """Cluster objects the components need before they start (the kubelet's RBAC)."""
        self.kubectl_run(
            ["apply", "--server-side", "--force-conflicts", "-f", str(MANIFESTS)], kubectl
        )

    def kubectl_run(
        self, args: list[str], kubectl: Path | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(kubectl or self.kubectl()), f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def _start_controller_manager(self, st: State, kcm: Path) -> None:
        argv = commands.controller_manager(kcm, self.dir, self.pki, st.ports)
        log = self.logs / "kube-controller-manager.log"
        rec = spawn("kube-controller-manager", argv, log)
        self._record(st, rec)

        def ok() -> bool:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE  # its self-signed serving cert; /healthz only
            url = f"https://127.0.0.1:{st.ports['controller-manager']}/healthz"
            with urllib.request.urlopen(url, timeout=2, context=ctx) as r:
                return bool(r.status == 200)

        wait_for("kube-controller-manager", ok, 60, rec, log)

    def _start_s3(self, st: State, versitygw: Path) -> None:
        root = self.dir / "s3" / "data"
        root.mkdir(parents=True, exist_ok=True)
        creds_path = self.dir / "s3" / "credentials.json"
        if not creds_path.exists():
            creds = {
                "access_key": "medforge-" + secrets.token_hex(4),
                "secret_key": secrets.token_urlsafe(30),
            }
            creds_path.write_text(json.dumps(creds))
            creds_path.chmod(0o600)
        creds = json.loads(creds_path.read_text())
        env = dict(
            os.environ,
            ROOT_ACCESS_KEY=creds["access_key"],
            ROOT_SECRET_KEY=creds["secret_key"],
        )
        versions = self.dir / "s3" / "versions"
        versions.mkdir(parents=True, exist_ok=True)
        argv = [
            str(versitygw),
            f"--port=127.0.0.1:{st.ports['s3']}",
            "--quiet",
            "posix",
            # Buckets may keep object versions (PutBucketVersioning), as production stores do:
            # erasure is tested against them.
            f"--versioning-dir={versions}",
            str(root),
        ]
        log = self.logs / "s3.log"
        rec = spawn("s3", argv, log, env=env)
        self._record(st, rec)

        def ok() -> bool:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{st.ports['s3']}/", timeout=2)
            except urllib.error.HTTPError:
                return True  # 403 without credentials: it is up and enforcing them
            return True

        wait_for("S3 server (versitygw)", ok, 60, rec, log)
        from medforge_localcluster.s3 import ensure_bucket

        ensure_bucket(self.s3_endpoint(), creds["access_key"], creds["secret_key"], DEFAULT_BUCKET)

    def _start_kubelet(self, st: State) -> None:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        # Container mode: each pod's own network namespace relays these to the host.
        env["MEDFORGE_KUBELET_FORWARD_PORTS"] = str(st.ports["s3"])
        argv = [
            sys.executable,
            "-m",
            "medforge_localcluster.kubelet",
            f"--state-dir={self.dir}",
            f"--kubeconfig={self.dir / 'kubelet.kubeconfig'}",
            f"--node-name={NODE_NAME}",
            f"--port={st.ports['kubelet']}",
            f"--api-server={self.api_server()}",
        ]
        log = self.logs / "kubelet.log"
        rec = spawn("kubelet", argv, log, env=env)
        self._record(st, rec)

        def ok() -> bool:
            proc = self.kubectl_run(
                [
                    "get",
                    "node",
                    NODE_NAME,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
                ],
                check=False,
            )
            return proc.returncode == 0 and proc.stdout.strip() == "True"

        wait_for("process kubelet (node Ready)", ok, 60, rec, log)

    def _wait_settled(self) -> None:
        """Pods need the namespace's default ServiceAccount, made by the controller manager."""

        def ok() -> bool:
            return (
                self.kubectl_run(["get", "serviceaccount", "default"], check=False).returncode == 0
            )

        wait_for("default ServiceAccount", ok, 60)

    # ----- down -----
    def _stop_processes(self) -> list[str]:
        st = self.state()
        stopped = []
        for name in reversed(ORDER):
            rec = st.processes.get(name)
            if rec is None:
                continue
            if alive(rec):
                stop(rec, timeout=30 if name == "kubelet" else 15)
                stopped.append(name)
            del st.processes[name]
            if self.state_path.exists():
                st.save(self.state_path)
            if name == "kubelet":
                self._stop_orphaned_containers()
        return stopped

    def _stop_orphaned_containers(self) -> None:
        """Container processes the kubelet could not end (it was killed, say) are ended here."""
        running = self.dir / "kubelet" / "running"
        if not running.is_dir():
            return
        for rec_file in running.glob("*.json"):
            data = json.loads(rec_file.read_text())
            if data.get("runc"):  # container mode: runc's own record outlives a killed runc
                release_container(data["runcRoot"], data["runc"], Path(data["bundle"]))
            if data.get("start_ticks") is not None:
                stop(ProcessRecord(rec_file.stem, int(data["pid"]), int(data["start_ticks"])), 5)
            rec_file.unlink(missing_ok=True)

    def down(self, purge: bool = False) -> list[str]:
        """Stop every process this cluster started; with `purge`, delete all its state too."""
        stopped = self._stop_processes()
        if purge and self.dir.exists():
            _release_mountpoints(self.dir)
            shutil.rmtree(self.dir)
        return stopped


def _release_mountpoints(state_dir: Path) -> None:
    """Remove the empty mount-point directories the kubelet had to create on the host."""
    created = state_dir / "kubelet" / "created-mountpoints"
    if not created.exists():
        return
    for line in sorted(created.read_text().splitlines(), key=len, reverse=True):
        path = Path(line)
        try:
            if path.is_dir():
                path.rmdir()
        except OSError:
            pass  # not empty any more, or in use by a running cluster with another state dir
