"""`medforge-evaluate`: a candidate revision and the served one scored on a hospital's own
held-out images, in the hospital's namespace, with its own data credentials. Only aggregate
figures leave (accuracy, macro-F1, ROC-AUC, per-class recall, sample count), and only when the
set holds at least `minSamples` images; below that the site reports "TooSmall" and nothing else.

Job config (the operator writes it from the EvaluationSet, with presigned URLs):
{"kind": "evaluate", "task": {name, classes, head}, "minSamples", "dataset": {...as training},
 "baseModel": {digest, files}, "candidate": {revision, digest, files}, "served": {...} | null,
 "head": {digest, files} | null (the hospital's own contribution, for a linear head),
 "fingerprints": [{digest, files}] (the hospital's own training sets), "output": {"result": URL}}
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medforge_common.artifacts import FINGERPRINTS_FILE, HEAD_FILE
from medforge_common.result import JobConfigError, job_parser
from medforge_ml import sitescore, transfers
from medforge_ml.basemodel import fetch_model_dir
from medforge_ml.composite import TaskHead
from medforge_ml.errors import ModelError
from medforge_ml.job import Ladder, Run, line, run_job
from medforge_trainer import config, dataset, sources
from medforge_trainer.errors import ConfigError

JSON = dict[str, Any]
TOO_SMALL = "TooSmall"
REPORTED = "Reported"


@dataclass(frozen=True)
class EvalConfig:
    task: tuple[str, tuple[str, ...], str]  # name, classes, head (as training reads them)
    base: tuple[str, tuple[JSON, ...], str | None]  # digest, files, local path
    dataset: config.DatasetSettings
    min_samples: int
    revisions: dict[str, JSON]  # "candidate" and, when one is served, "served"
    own_head: JSON | None = None
    fingerprints: tuple[JSON, ...] = ()
    result_url: str = ""


def _artifact(cfg: JSON, key: str, required: bool) -> JSON | None:
    raw = cfg.get(key)
    if raw is None and not required:
        return None
    if (
        not isinstance(raw, dict)
        or not isinstance(raw.get("digest"), str)
        or not isinstance(raw.get("files"), list)
    ):
        raise ConfigError(f"{key}: expected {{digest, files: [{{name, url}}]}}")
    return raw


def parse(cfg: Any) -> EvalConfig:
    if not isinstance(cfg, dict):
        raise JobConfigError("invalid job config: the job config must be a JSON object")
    try:
        task, base, ds = config.parse_shared(cfg)
        n = cfg.get("minSamples", 20)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError("minSamples: a whole number >= 1")
        prints = cfg.get("fingerprints") or []
        if not isinstance(prints, list):
            raise ConfigError("fingerprints: expected a list of artifacts")
        out = cfg.get("output") or {}
        revisions = {"candidate": _artifact(cfg, "candidate", True) or {}}
        if (served := _artifact(cfg, "served", False)) is not None:
            revisions["served"] = served
        return EvalConfig(
            task,
            base,
            ds,
            n,
            revisions,
            _artifact(cfg, "head", False),
            tuple(p for p in prints if isinstance(p, dict)),
            str(out.get("result") or "") if isinstance(out, dict) else "",
        )
    except ConfigError as exc:
        raise JobConfigError(f"invalid job config: {exc}") from exc


def overlap(cfg: EvalConfig, mine: list[str], work: Path) -> int:
    """How many of the evaluation set's files the hospital's own training sets held (by name
    and size): a score on images the model was trained on says little."""
    seen: set[str] = set()
    for i, art in enumerate(cfg.fingerprints):
        dest = work / f"prints-{i}"
        sitescore.fetch_listed("training fingerprints", str(art["digest"]), art["files"], dest)
        if (dest / FINGERPRINTS_FILE).is_file():
            data = json.loads((dest / FINGERPRINTS_FILE).read_text())
            seen |= {str(f) for f in data.get("files") or []}
    return len(set(mine) & seen)


def _images(root: Path, classes: tuple[str, ...], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    files = dataset.scan(root, classes)
    pics, labels = [], []
    for label, c in enumerate(classes):
        for p in files[c]:
            img = dataset.decode(p, size)
            if img is not None:
                pics.append(img)
                labels.append(label)
    if not pics:
        raise ModelError("evaluation set: no readable image")
    return torch.stack(pics), torch.tensor(labels, dtype=torch.long)


def _head(cfg: EvalConfig, work: Path) -> TaskHead:
    name, classes, head = cfg.task
    weights: dict[str, torch.Tensor] = {}
    if head == "linear":
        if cfg.own_head is None:
            raise ModelError(
                f"task {name} has a linear head: the site needs a Ready contribution of "
                "its own for this task (its head is the only one it receives)"
            )
        dest = work / "head"
        sitescore.fetch_listed("own head", str(cfg.own_head["digest"]), cfg.own_head["files"], dest)
        weights = sitescore.read_head(dest / HEAD_FILE)
    return TaskHead(name, list(classes), head, weights)


def run(cfg: EvalConfig, work: Path) -> JSON:
    classes = cfg.task[1]
    root = sources.materialize_dataset(cfg.dataset, work / "data")
    files = dataset.scan(root, classes)
    result: JSON = {"state": TOO_SMALL}
    if sum(len(v) for v in files.values()) >= cfg.min_samples:
        digest, base_files, base_path = cfg.base
        base = fetch_model_dir(digest, list(base_files), base_path, work / "base")
        images, labels = _images(root, classes, sitescore.image_size(base))
        head = _head(cfg, work)
        result = {"state": REPORTED}
        for key, art in cfg.revisions.items():
            dest = work / key
            sitescore.fetch_listed(f"{key} revision", str(art["digest"]), art["files"], dest)
            result[key] = sitescore.score(base, dest, head, images, labels)
            if art.get("revision") is not None:
                result[key]["revision"] = art["revision"]
        result["overlap"] = overlap(cfg, dataset.file_fingerprints(root, files), work)
        if result["candidate"]["samples"] < cfg.min_samples:  # unreadable images skipped
            result = {"state": TOO_SMALL}
    if cfg.result_url:
        with tempfile.NamedTemporaryFile("w", suffix=".json", dir=work, delete=False) as f:
            json.dump(result, f, sort_keys=True)
        transfers.upload(cfg.result_url, Path(f.name), "evaluation result")
    print(json.dumps({"state": result["state"], "overlap": result.get("overlap", 0)}), flush=True)
    return result


def _work(job: Run[EvalConfig]) -> JSON:
    return run(job.cfg, job.work)


LADDER: Ladder[EvalConfig] = [(ModelError, line("evaluation failed"))]


def main(argv: list[str] | None = None) -> int:
    p = job_parser("medforge-evaluate", (__doc__ or "").splitlines()[0], "nothing")
    args = p.parse_args(argv)
    return run_job(args, parse, _work, LADDER, "evaluate", "evaluation failed")


if __name__ == "__main__":
    sys.exit(main())
