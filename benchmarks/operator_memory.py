"""The operator's peak memory with 10,000 LoRAContributions of 4 KiB specs (tenants write their
namespaces, so what the operator keeps of each object must be bounded), side by side with a
reference in the same run: a plain watch client that keeps every contribution whole, as a naive
informer cache does.

    .venv/bin/python benchmarks/operator_memory.py [--count 10000] [--namespaces 20]

The contributions name a BaseModel that is never registered: each gets a status (the operator
reads, decides and writes once per object) and no Job, so what is measured is what the
operator holds, not the Jobs' cost. Writes benchmarks/results/operator_memory.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import signal
import subprocess
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
from tests.cluster.conftest import OperatorProcess  # noqa: E402

# The reference: list, then watch, every contribution and keep each one whole.
NAIVE_CACHE = """
import sys, threading
from kubernetes import client, config, watch
config.load_kube_config(sys.argv[1])
api = client.CustomObjectsApi()
cache = {}
def run():
    rv = None
    while True:
        if rv is None:
            got = api.list_cluster_custom_object("medforge.io", "v1alpha1", "loracontributions")
            for o in got["items"]:
                cache[(o["metadata"]["namespace"], o["metadata"]["name"])] = o
            rv = got["metadata"]["resourceVersion"]
            print(len(cache), flush=True)
        for ev in watch.Watch().stream(api.list_cluster_custom_object, "medforge.io", "v1alpha1",
                                       "loracontributions", resource_version=rv, timeout_seconds=60):
            o = ev["object"]
            rv = o["metadata"]["resourceVersion"]
            cache[(o["metadata"]["namespace"], o["metadata"]["name"])] = o
run()
"""


def spec_of(base: str, size: int) -> dict[str, Any]:
    """A spec of about `size` bytes: class names fill it, as a large vocabulary would."""
    per = 120
    classes = [f"{i:03d}-" + "c" * (per - 4) for i in range(max(2, size // (per + 3)))]
    return {
        "baseModel": {"name": base},
        "task": {"name": "breakhis", "classes": classes},
        "dataset": {"uri": "s3://hospital-data/breakhis/"},
    }


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the cluster
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=10_000)
    ap.add_argument("--namespaces", type=int, default=20)
    ap.add_argument("--spec-bytes", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "operator_memory.json"))
    args = ap.parse_args()
    spaces = [f"mem-{i:02d}" for i in range(args.namespaces)]
    state = Path(tempfile.mkdtemp(prefix="medforge-bench-"))
    lc = LocalCluster(state)
    lc.up(log=False)
    op: OperatorProcess | None = None
    naive: subprocess.Popen[bytes] | None = None
    try:
        access, forge = prepare(lc, state, spaces)
        config.load_kube_config(str(lc.kubeconfig))
        cfg = client.Configuration.get_default_copy()
        cfg.connection_pool_maxsize = args.workers * 2
        custom = client.CustomObjectsApi(client.ApiClient(cfg))
        spec = spec_of("never-registered", args.spec_bytes)
        spec_bytes = len(json.dumps(spec))

        def create(i: int) -> None:
            body = {
                "apiVersion": "medforge.io/v1alpha1",
                "kind": "LoRAContribution",
                "metadata": {"name": f"c-{i:05d}"},
                "spec": spec,
            }
            # Read to the end: the connection goes back to the pool.
            _ = custom.create_namespaced_custom_object(
                "medforge.io",
                "v1alpha1",
                spaces[i % len(spaces)],
                "loracontributions",
                body,
                _preload_content=False,
            ).data

        t0 = time.monotonic()
        with cf.ThreadPoolExecutor(args.workers) as pool:
            list(pool.map(create, range(args.count)))
        create_s = time.monotonic() - t0
        print(f"created {args.count} contributions of {spec_bytes} B specs in {create_s:.0f} s")

        naive = subprocess.Popen(
            [sys.executable, "-c", NAIVE_CACHE, str(lc.kubeconfig)], stdout=subprocess.PIPE
        )
        assert naive.stdout is not None
        naive_count = int(naive.stdout.readline())
        naive_rss = peak_rss_mib(naive.pid)
        naive.terminate()
        naive.wait()
        naive = None
        print(f"naive cache: {naive_count} objects, peak RSS {naive_rss:.0f} MiB")

        op = OperatorProcess(access, forge, state / "operator.log", MEDFORGE_CONCURRENCY="16")
        op.start()
        t0 = time.monotonic()
        samples: list[float] = []
        done = 0
        while time.monotonic() - t0 < 1800:
            time.sleep(10)
            assert op.proc is not None and op.alive(), op.tail()
            samples.append(rss_mib(op.proc.pid))
            got = custom.list_cluster_custom_object(
                "medforge.io", "v1alpha1", "loracontributions", _preload_content=False
            )
            items = json.loads(got.data)["items"]
            done = sum(1 for o in items if (o.get("status") or {}).get("observedGeneration"))
            del items, got
            print(f"  {time.monotonic() - t0:5.0f} s: {done} statuses, RSS {samples[-1]:.0f} MiB")
            if done >= args.count:
                break
        settle_s = time.monotonic() - t0
        time.sleep(20)  # a resync pass and the polling of stalled objects on top
        assert op.proc is not None
        peak = peak_rss_mib(op.proc.pid)
        result = {
            "contributions": args.count,
            "namespaces": args.namespaces,
            "spec_bytes": spec_bytes,
            "create_seconds": round(create_s, 1),
            "statuses_written": done,
            "seconds_until_every_status": round(settle_s, 1),
            "operator_peak_rss_mib": round(peak, 1),
            "operator_rss_samples_mib": [round(s) for s in samples],
            "naive_cache_peak_rss_mib": round(naive_rss, 1),
            "operator_over_naive_cache": round(peak / naive_rss, 2),
            "target_mib": 512,
            "cpus": os.cpu_count(),
        }
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return 0 if peak < 512 else 1
    finally:
        if naive is not None:
            naive.kill()
        if op is not None:
            op.stop()
        lc.down(purge=True)


if __name__ == "__main__":
    sys.exit(main())
