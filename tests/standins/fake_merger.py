"""Stand-in merger: verifies each input through its presigned URLs, excludes inputs that fail,
uploads a composite and its manifest, reports metrics, regression and inputs."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from medforge_common.manifest import FileEntry, Manifest, digest_of
from medforge_common.result import result_reference
from medforge_ml import transfers

TERM = Path("/dev/termination-log")


def get(url: str) -> bytes:
    """Through the shared transfers, as the real merger: a store outage is retried."""
    with tempfile.TemporaryDirectory() as d:
        transfers.download(url, Path(d) / "f", "input")
        return (Path(d) / "f").read_bytes()


def put(url: str, data: bytes) -> None:
    with tempfile.NamedTemporaryFile() as f:
        f.write(data)
        f.flush()
        transfers.upload(url, Path(f.name), "output")


def sign(cfg: dict, result: dict, files: dict[str, bytes]) -> None:  # type: ignore[type-arg]
    from medforge_merger import attest, config  # imports torch: only where the forge signs

    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        for name, data in files.items():
            (work / name).write_bytes(data)
        bundle = attest.sign_revision(config.parse(cfg), result, [work / n for n in files], work)
        put(cfg["output"]["files"][bundle.name], bundle.read_bytes())


def included(entry: dict, item: dict) -> dict:  # type: ignore[type-arg]
    """As the real merger: an input trained from a revision is added relative to it (its
    coefficient 1, its parent recorded)."""
    if item.get("parent"):
        return entry | {"state": "Included", "coefficient": 1.0, "parent": item["parent"]}
    return entry | {"state": "Included", "coefficient": 0.5}


def main() -> None:
    cfg = json.loads(Path(os.environ["MEDFORGE_JOB_CONFIG_FILE"]).read_text())
    h = hashlib.sha256()
    inputs = []
    metrics: dict[str, dict[str, float]] = {}
    regression: dict[str, float] = {}
    if "current" in cfg:
        h.update(
            get(
                next(
                    f["url"] for f in cfg["current"]["files"] if f["name"] == "adapter.safetensors"
                )
            )
        )
        metrics.update(cfg["current"].get("metrics") or {})
    previous = (cfg.get("previous") or {}).get("metrics") or {}
    if any(str(i.get("task") or "").startswith("crash-merge") for i in cfg["inputs"]):
        # An input that breaks the merge as a whole (as tensors that exhaust memory would).
        TERM.write_text("merge failed: MemoryError")
        sys.exit(1)
    for i in cfg["inputs"]:
        if str(i.get("task") or "").startswith("slow-merge-"):  # "slow-merge-N": N seconds
            time.sleep(float(str(i["task"]).rsplit("-", 1)[1]))
        files = {f["name"]: f["url"] for f in i["files"]}
        raw = get(files["manifest.json"])
        entry = {"namespace": i["namespace"], "name": i["name"], "digest": i["digest"]}
        if digest_of(raw) != i["digest"]:
            inputs.append(entry | {"state": "Excluded", "reason": "manifest digest mismatch"})
            continue
        if str(i.get("task") or "").startswith("reject-"):  # a poisoned input
            inputs.append(
                entry | {"state": "Excluded", "reason": "manifest meta.rank 'x' is no number"}
            )
            continue
        manifest = Manifest.from_json(raw.decode())
        data = get(files["adapter.safetensors"])
        if hashlib.sha256(data).hexdigest() != manifest.files[0].sha256:
            inputs.append(
                entry | {"state": "Excluded", "reason": "adapter.safetensors sha256 mismatch"}
            )
            continue
        h.update(data)
        task = i.get("task") or "task"
        metrics[task] = {"accuracy": 0.8, "samples": 200, "classes": 2}
        if task.startswith("regress"):  # every task merged before drops by 0.3
            for name, m in previous.items():
                metrics[name] = {**m, "accuracy": round(float(m["accuracy"]) - 0.3, 4)}
                regression[name] = 0.3
        inputs.append(included(entry, i))
    if not any(i["state"] == "Included" for i in inputs):
        # The contract: a verdict on every input is exit 3 with one JSON line, the report in
        # result.json.
        report = json.dumps({"artifact": {}, "inputs": inputs}).encode()
        put(cfg["output"]["files"]["result.json"], report)
        ref = result_reference({"artifact": {}}, report, "result.json")
        line = {"verdict": "NoUsableInput", "message": "no input passed verification"}
        TERM.write_text(json.dumps(line | {"resultFile": ref["resultFile"]}))
        sys.exit(3)
    composite = h.digest() * 32
    manifest = Manifest(
        "composite",
        cfg["baseModel"]["digest"],
        [FileEntry("adapter.safetensors", hashlib.sha256(composite).hexdigest(), len(composite))],
        {
            "strategy": cfg["strategy"].get("type"),
            "inputs": [i for i in inputs if i["state"] == "Included"],
        },
    )
    body = manifest.to_json().encode()
    put(cfg["output"]["files"]["adapter.safetensors"], composite)
    put(cfg["output"]["files"]["manifest.json"], body)
    score = sum(m["accuracy"] for m in metrics.values()) / max(1, len(metrics))
    result = {
        "artifact": {
            "uri": cfg["output"]["uri"],
            "digest": digest_of(body),
        },
        "metrics": metrics,
        "score": round(score, 4),
        "regression": regression,
        "inputs": inputs,
        "integration": cfg["integration"],
        "merge": {"seconds": 0.25, "inputs": len(inputs), "searchEvaluations": 40},
    }
    if cfg.get("signing"):  # the real merger's statement, over the stand-in's files
        sign(cfg, result, {"adapter.safetensors": composite, "manifest.json": body})
    # The contract: the full result beside the composite, its digest in the termination
    # message (which holds 4 KiB: about 20 inputs' entries).
    full = json.dumps(result, sort_keys=True).encode()
    put(cfg["output"]["files"]["result.json"], full)
    TERM.write_text(json.dumps(result_reference(result, full, "result.json")))
    print(f"merged revision {cfg['composite']['revision']} from {len(inputs)} input(s)")


if __name__ == "__main__":
    main()
