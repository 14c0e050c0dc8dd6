"""`make demo`: bring up the local cluster, show a Job and the S3 store working through it, then
the MedForge loop itself (`forge_demo`): contributions trained and merged by the operator.

The demo leaves the cluster running so that you can explore it with kubectl; stop it with
`make down`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from typing import Any

from medforge_localcluster.cluster import DEFAULT_BUCKET, LocalCluster
from medforge_localcluster.errors import SetupError
from medforge_localcluster.s3 import client

NAMESPACE = "medforge-demo"

# The Job receives a presigned PUT URL, as MedForge's training Jobs do, and no credentials.
SCRIPT = textwrap.dedent(
    """
    import json, os, pathlib, urllib.request
    body = b"hello from " + os.environ["POD_NAME"].encode()
    req = urllib.request.Request(os.environ["UPLOAD_URL"], data=body, method="PUT")
    with urllib.request.urlopen(req) as r:
        print("uploaded", len(body), "bytes, HTTP", r.status)
    pathlib.Path("/dev/termination-log").write_text(json.dumps({"uploaded": len(body)}))
    """
)


def step(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def upload_job(name: str, url: str) -> dict[str, Any]:
    """A restricted Job whose one pod uploads through the presigned URL."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "backoffLimit": 0,
            "ttlSecondsAfterFinished": 3600,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 1000,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [
                        {
                            "name": "upload",
                            "image": "medforge/demo",
                            "command": ["python", "-c", SCRIPT],
                            "env": [
                                {"name": "UPLOAD_URL", "value": url},
                                {
                                    "name": "POD_NAME",
                                    "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                                },
                            ],
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]},
                            },
                        }
                    ],
                }
            },
        },
    }


def _show_job(k: Callable[..., str], name: str) -> None:
    k("wait", "-n", NAMESPACE, f"job/{name}", "--for=condition=Complete", "--timeout=120s")
    print(k("get", "jobs,pods", "-n", NAMESPACE, "-l", f"job-name={name}"), end="")
    step(f"kubectl logs job/{name}")
    print(k("logs", "-n", NAMESPACE, f"job/{name}"), end="")
    step("the termination message the operator reads from the pod's status")
    print(
        k(
            "get",
            "pods",
            "-n",
            NAMESPACE,
            "-l",
            f"job-name={name}",
            "-o",
            "jsonpath={.items[0].status.containerStatuses[0].state.terminated.message}",
        )
    )


def main() -> int:
    cluster = LocalCluster()
    try:
        step("bringing up the local cluster (builds the binaries on first use)")
        cluster.up()
        env = cluster.env()
        kubectl = [str(cluster.kubectl()), f"--kubeconfig={cluster.kubeconfig}"]

        def k(*args: str, input: str | None = None) -> str:
            out = subprocess.run([*kubectl, *args], input=input, capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(out.stderr.strip())
            return out.stdout

        step("kubectl get nodes")
        print(k("get", "nodes", "-o", "wide"), end="")
        creds = cluster.s3_credentials()
        s3 = client(env["MEDFORGE_S3_ENDPOINT"], creds["access_key"], creds["secret_key"])
        key = f"demo/{int(time.time())}.txt"
        url = s3.generate_presigned_url(
            "put_object", Params={"Bucket": DEFAULT_BUCKET, "Key": key}, ExpiresIn=600
        )
        step(f"running a Job that uploads s3://{DEFAULT_BUCKET}/{key} through a presigned URL")
        subprocess.run([*kubectl, "create", "namespace", NAMESPACE], capture_output=True)
        k(
            "label",
            "namespace",
            NAMESPACE,
            "--overwrite",
            "pod-security.kubernetes.io/enforce=restricted",
        )
        name = f"demo-{int(time.time())}"
        job = upload_job(name, url)
        k("apply", "-f", "-", input=json.dumps(job))
        _show_job(k, name)
        body = s3.get_object(Bucket=DEFAULT_BUCKET, Key=key)["Body"].read()
        step(f"read back from S3 with the store's credentials: {body.decode()!r}")

        from medforge_localcluster import forge_demo

        forge_demo.run(
            k,
            s3,
            DEFAULT_BUCKET,
            env["MEDFORGE_S3_ENDPOINT"],
            creds,
            cluster.kubeconfig,
            cluster.logs,
            step,
        )
    except (SetupError, RuntimeError, TimeoutError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    step("the cluster is still up; try it yourself:")
    print(
        "  eval $(.venv/bin/medforge localcluster env)\n  kubectl get nodes,jobs -A\n"
        "  make down    # stops every process"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
