"""1,000 LoRAContributions across 20 namespaces, applied at once, against a plain client script
that creates the same 1,000 Jobs directly, in the same run on the same local cluster.

    .venv/bin/python benchmarks/operator_scale.py [--count 1000] [--namespaces 20]
        [--concurrency 32] [--queued-only]

Reports: time until all Jobs exist, time until all statuses show the Jobs' completion, p50/p99
per-object latency, the operator's peak RSS, and the ratio of the operator's Job-creation
throughput to the direct script's, and to a script that makes the same writes as the operator's
path with no operator logic. Writes benchmarks/results/operator_scale.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kubernetes import client, config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_cluster import peak_rss_mib, prepare  # noqa: E402
from medforge_localcluster.cluster import LocalCluster  # noqa: E402
from medforge_localcluster.kube import Kube  # noqa: E402
from medforge_operator import contribution as contribution_status  # noqa: E402
from medforge_operator.kube import Kube as OperatorKube  # noqa: E402
from tests.cluster.conftest import OperatorProcess, register_base_model  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def contribution(name: str, base: tuple[str, str], queue: str = "") -> dict[str, Any]:
    doc: dict[str, Any] = {
        "apiVersion": "medforge.io/v1alpha1",
        "kind": "LoRAContribution",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"name": base[0]},
            "task": {"name": "breakhis", "classes": ["benign", "malignant"]},
            "dataset": {"uri": "s3://hospital-data/breakhis/"},
        },
    }
    if queue:
        doc["spec"]["resources"] = {"queueName": queue}
    return doc


def direct_job(name: str, ns: str) -> dict[str, Any]:
    """The Job a client script would create: the operator's manifest shape, suspended so that
    it does not run."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": ns, "labels": {"bench": "direct"}},
        "spec": {
            "suspend": True,
            "backoffLimit": 2,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "train",
                            "image": "medforge/trainer",
                            "command": ["medforge-train"],
                            "env": [{"name": "MEDFORGE_JOB_CONFIG", "value": "x" * 3000}],
                        }
                    ],
                }
            },
        },
    }


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the cluster
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--namespaces", type=int, default=20)
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=32, help="the operator's workers")
    ap.add_argument(
        "--queued-only", action="store_true", help="skip the end-to-end run (no Jobs run)"
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "operator_scale.json"))
    args = ap.parse_args()
    n, spaces = args.count, [f"bench-{i:02d}" for i in range(args.namespaces)]
    os.environ.setdefault("MEDFORGE_KUBELET_MAX_PODS", "24")
    state = Path(tempfile.mkdtemp(prefix="medforge-bench-"))
    lc = LocalCluster(state)
    lc.up(log=False)
    op: OperatorProcess | None = None
    try:
        access, forge = prepare(lc, state, spaces)
        base = forge.upload_base_model("bench-model")
        time.sleep(2)  # default ServiceAccounts
        config.load_kube_config(str(lc.kubeconfig))
        cfg = client.Configuration.get_default_copy()
        cfg.connection_pool_maxsize = args.workers * 2
        api = client.ApiClient(cfg)
        batch, custom = client.BatchV1Api(api), client.CustomObjectsApi(api)
        raw = Kube.from_kubeconfig(lc.kubeconfig)
        items = [(spaces[i % len(spaces)], f"c-{i:04d}") for i in range(n)]

        # 1. The direct script: the API server's own pace for creating these Jobs.
        t0 = time.monotonic()
        with cf.ThreadPoolExecutor(args.workers) as pool:
            list(
                pool.map(
                    # Raw responses, read to the end (an unread one would keep its connection
                    # out of the pool and cost a TLS handshake per Job).
                    lambda it: (
                        batch.create_namespaced_job(
                            it[0], direct_job(it[1], it[0]), _preload_content=False
                        ).data
                    ),
                    items,
                )
            )
        direct_s = time.monotonic() - t0
        for ns in spaces:
            batch.delete_collection_namespaced_job(ns, label_selector="bench=direct")
        time.sleep(3)

        # 1b. The same script making every write the operator's path makes per contribution:
        # the CR create, the Job create, a status patch and an Event, with as many clients as
        # the benchmark's appliers and the operator's workers together. This is the pace an
        # operator with no overhead at all could reach on this API server.
        events = OperatorKube()

        def same_writes(it: tuple[str, str]) -> None:
            ns, name = it[0], "w-" + it[1]
            cr = custom.create_namespaced_custom_object(
                "medforge.io", "v1alpha1", ns, "loracontributions", contribution(name, base)
            )
            _ = batch.create_namespaced_job(ns, direct_job(name, ns), _preload_content=False).data
            # The very status the operator writes for a contribution whose Job was created.
            seen = contribution_status.Observation(1, name, {"metadata": {"name": name}})
            status = contribution_status.compute_status({}, seen)
            custom.patch_namespaced_custom_object_status(
                "medforge.io", "v1alpha1", ns, "loracontributions", name, {"status": status}
            )
            events.post_event(cr, "Normal", "JobCreated", "Pending: training Job " + name)

        t0 = time.monotonic()
        with cf.ThreadPoolExecutor(args.workers + args.concurrency) as pool:
            list(pool.map(same_writes, items))
        same_writes_s = time.monotonic() - t0
        for ns in spaces:
            batch.delete_collection_namespaced_job(ns, label_selector="bench=direct")
            custom.delete_collection_namespaced_custom_object(
                "medforge.io", "v1alpha1", ns, "loracontributions"
            )
        while custom.list_cluster_custom_object("medforge.io", "v1alpha1", "loracontributions")[
            "items"
        ]:
            time.sleep(1)
        time.sleep(3)

        # 2. The operator.
        log = state / "operator.log"
        op = OperatorProcess(
            access,
            forge,
            log,
            MEDFORGE_CONCURRENCY=str(args.concurrency),
            MEDFORGE_STORE_BUCKET="medforge",
        )
        op.start()
        register_base_model(access, base[0], base[1])
        time.sleep(2)

        def run(prefix: str, queue: str, wait_status: bool) -> dict[str, Any]:
            created: dict[str, float] = {}
            t0 = time.monotonic()

            def apply(it: tuple[str, str]) -> None:
                custom.create_namespaced_custom_object(
                    "medforge.io",
                    "v1alpha1",
                    it[0],
                    "loracontributions",
                    contribution(prefix + it[1], base, queue),
                )
                created[f"{it[0]}/{prefix}{it[1]}"] = time.monotonic()

            with cf.ThreadPoolExecutor(args.workers) as pool:
                list(pool.map(apply, items))
            applied_s = time.monotonic() - t0
            job_seen: dict[str, float] = {}
            done_seen: dict[str, float] = {}
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline and (
                len(job_seen) < n or (wait_status and len(done_seen) < n)
            ):
                now = time.monotonic()
                if len(job_seen) < n:
                    # Metadata only: the poller must not load the API server it measures.
                    for m in raw.list_metadata(
                        "/apis/batch/v1/jobs", labelSelector="medforge.io/component=train"
                    ):
                        owner = m["metadata"]["labels"]["medforge.io/owner"]
                        if owner.startswith(prefix):
                            job_seen.setdefault(f"{m['metadata']['namespace']}/{owner}", now)
                if wait_status and len(job_seen) == n:
                    cl = custom.list_cluster_custom_object(
                        "medforge.io", "v1alpha1", "loracontributions"
                    )
                    for c in cl["items"]:
                        phase = (c.get("status") or {}).get("phase")
                        if c["metadata"]["name"].startswith(prefix) and phase in (
                            "Succeeded",
                            "Failed",
                        ):
                            key = f"{c['metadata']['namespace']}/{c['metadata']['name']}"
                            done_seen.setdefault(key, now)
                time.sleep(0.5)
            out: dict[str, Any] = {
                "apply_seconds": round(applied_s, 2),
                "all_jobs_seconds": round(max(job_seen.values()) - t0, 2),
                "jobs_seen": len(job_seen),
            }
            job_lat = [job_seen[k] - created[k] for k in job_seen if k in created]
            out["job_latency_p50_s"] = round(pct(job_lat, 0.5), 2)
            out["job_latency_p99_s"] = round(pct(job_lat, 0.99), 2)
            if wait_status:
                done_lat = [done_seen[k] - created[k] for k in done_seen if k in created]
                out["all_statuses_complete_seconds"] = round(max(done_seen.values()) - t0, 2)
                out["statuses_complete"] = len(done_seen)
                out["status_latency_p50_s"] = round(pct(done_lat, 0.5), 2)
                out["status_latency_p99_s"] = round(pct(done_lat, 0.99), 2)
            return out

        # 2a. Control-plane throughput: Kueue-queued contributions, whose Jobs are created
        # suspended exactly like the direct script's, so nothing runs in either measurement.
        cpu0 = cpu_seconds(op.proc.pid) if op.proc else float("nan")
        queued = run("q-", "bench", wait_status=False)
        queued["operator_cpu_seconds"] = round(
            (cpu_seconds(op.proc.pid) if op.proc else float("nan")) - cpu0, 2
        )
        # 2b. End to end: the Jobs run through the process kubelet and the statuses complete.
        full = None if args.queued_only else run("r-", "", wait_status=True)
        rss = peak_rss_mib(op.proc.pid) if op.proc else float("nan")
        result = {
            "count": n,
            "namespaces": len(spaces),
            "operator_concurrency": args.concurrency,
            "direct_jobs_seconds": round(direct_s, 2),
            "direct_jobs_per_second": round(n / direct_s, 1),
            "same_writes_seconds": round(same_writes_s, 2),
            "operator_queued": queued,
            "operator_queued_jobs_per_second": round(n / queued["all_jobs_seconds"], 1),
            "throughput_ratio_queued": round(direct_s / queued["all_jobs_seconds"], 3),
            "ratio_queued_to_same_writes": round(same_writes_s / queued["all_jobs_seconds"], 3),
            "operator_peak_rss_mib": round(rss, 1),
            "kubelet_max_pods": int(os.environ["MEDFORGE_KUBELET_MAX_PODS"]),
            "cpus": os.cpu_count(),
        }
        if full is not None:
            result["operator_end_to_end"] = full
            result["throughput_ratio_end_to_end"] = round(direct_s / full["all_jobs_seconds"], 3)
        print(json.dumps(result, indent=2))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    finally:
        if op is not None:
            op.stop()
        lc.down(purge=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
