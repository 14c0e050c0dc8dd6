"""The command lines of the local control plane's processes (pure): what etcd,
kube-apiserver and kube-controller-manager are started with."""

from __future__ import annotations

from pathlib import Path

CONTROLLERS = (
    "job-controller",
    "garbage-collector-controller",
    "namespace-controller",
    "ttl-after-finished-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    "cronjob-controller",
    # The chart's Deployment gets its pods (container mode runs them from the images).
    "deployment-controller",
    "replicaset-controller",
    "pod-garbage-collector-controller",
    # Fills view, edit and admin from the roles labelled to aggregate into them (MedForge's
    # tenant roles among them), as in any real cluster.
    "clusterrole-aggregation-controller",
)


def etcd(binary: Path, state_dir: Path, client: str, peer: str) -> list[str]:
    return [
        str(binary),
        "--name=medforge",
        f"--data-dir={state_dir / 'etcd'}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=medforge={peer}",
        "--listen-metrics-urls=",
        # A throwaway single-member store for tests and demos: fsync buys nothing here.
        "--unsafe-no-fsync",
        "--quota-backend-bytes=4294967296",
        "--log-level=warn",
    ]


def apiserver(binary: Path, p: Path, ports: dict[str, int]) -> list[str]:
    return [
        str(binary),
        f"--etcd-servers=http://127.0.0.1:{ports['etcd']}",
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        f"--secure-port={ports['apiserver']}",
        f"--tls-cert-file={p / 'apiserver.crt'}",
        f"--tls-private-key-file={p / 'apiserver.key'}",
        f"--client-ca-file={p / 'ca.crt'}",
        f"--token-auth-file={p / 'tokens.csv'}",
        "--anonymous-auth=false",
        "--authorization-mode=RBAC",
        # PodSecurity is on by default; listed so that nobody drops it by accident.
        "--enable-admission-plugins=NamespaceLifecycle,ServiceAccount,PodSecurity,"
        "LimitRanger,ResourceQuota,DefaultStorageClass,MutatingAdmissionWebhook,"
        "ValidatingAdmissionWebhook,ValidatingAdmissionPolicy",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={p / 'sa.pub'}",
        f"--service-account-signing-key-file={p / 'sa.key'}",
        "--service-cluster-ip-range=10.0.0.0/24",
        f"--kubelet-client-certificate={p / 'apiserver-kubelet-client.crt'}",
        f"--kubelet-client-key={p / 'apiserver-kubelet-client.key'}",
        f"--kubelet-certificate-authority={p / 'ca.crt'}",
        "--kubelet-preferred-address-types=InternalIP",
        "--allow-privileged=false",
        "--profiling=false",
        "--max-requests-inflight=800",
        "--max-mutating-requests-inflight=400",
        "--v=1",
    ]


def controller_manager(
    binary: Path, state_dir: Path, pki: Path, ports: dict[str, int]
) -> list[str]:
    return [
        str(binary),
        f"--kubeconfig={state_dir / 'controller-manager.kubeconfig'}",
        f"--authentication-kubeconfig={state_dir / 'controller-manager.kubeconfig'}",
        f"--authorization-kubeconfig={state_dir / 'controller-manager.kubeconfig'}",
        "--bind-address=127.0.0.1",
        f"--secure-port={ports['controller-manager']}",
        f"--controllers={','.join(CONTROLLERS)}",
        "--leader-elect=false",
        "--use-service-account-credentials=true",
        f"--service-account-private-key-file={pki / 'sa.key'}",
        f"--root-ca-file={pki / 'ca.crt'}",
        # Local clusters carry bursts (a thousand Jobs at once): do not throttle at 20 qps.
        "--kube-api-qps=200",
        "--kube-api-burst=400",
        "--concurrent-job-syncs=20",
        "--concurrent-gc-syncs=20",
        "--v=1",
    ]
