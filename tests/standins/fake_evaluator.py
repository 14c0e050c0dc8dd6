"""Stand-in evaluator: fetches the candidate and the served revision through their presigned
URLs and checks them against their manifests (the real code path), then reports figures chosen
by its dataset's URI instead of scoring images: ".../regress/" (the candidate loses 0.4 of the
served revision's accuracy), ".../small/" (5 images, with figures the operator must drop),
".../never/" (never reports), anything else (the candidate a little better)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from medforge_ml import sitescore, transfers

TERM = Path("/dev/termination-log")


def figures(accuracy: float, samples: int) -> dict[str, object]:
    return {
        "accuracy": accuracy,
        "f1": accuracy,
        "auc": min(1.0, accuracy + 0.05),
        "samples": samples,
        "classes": 2,
        "recall": {"benign": accuracy, "malignant": accuracy},
    }


def main() -> None:
    cfg = json.loads(Path(os.environ["MEDFORGE_JOB_CONFIG_FILE"]).read_text())
    uri = str(cfg["dataset"].get("uri") or "")
    if "/never/" in uri:
        time.sleep(3600)
    with tempfile.TemporaryDirectory() as tmp:
        for key in ("candidate", "served"):
            art = cfg.get(key)
            if art:
                sitescore.fetch_listed(key, art["digest"], art["files"], Path(tmp) / key)
        samples = 5 if "/small/" in uri else 200
        drop = 0.4 if "/regress/" in uri else -0.01
        result: dict[str, object] = {"state": "Reported", "candidate": figures(0.9 - drop, samples)}
        if cfg.get("served"):
            result["served"] = figures(0.9, samples)
        out = Path(tmp) / "evaluation.json"
        out.write_text(json.dumps(result))
        transfers.upload(cfg["output"]["result"], out, "evaluation result")
    TERM.write_text(json.dumps({"state": result["state"]}))


if __name__ == "__main__":
    main()
