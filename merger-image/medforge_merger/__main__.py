"""`medforge-merge`: job config in, verified inputs, a streamed merge, the composite and its
manifest out (presigned PUT URLs, or a directory by hand), the result JSON in the
termination message. Any failure: non-zero exit and a one-line reason there."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file

from medforge_common.manifest import (
    Manifest,
    ManifestError,
    check_safe_name,
    sha256_file,
    verify_dir,
)
from medforge_common.metrics import classification_metrics
from medforge_common.result import DEFAULT_PATH, encode_result, failure_line
from medforge_merger.adapters import (
    ADAPTER_FILE,
    SUFFIX_A,
    SUFFIX_B,
    SUFFIX_DELTA,
    Adapter,
    InputRejected,
    check_compatible,
    load_adapter,
)
from medforge_merger.evaluate import Deltas, EvaluationError, Evaluator
from medforge_merger.merge import SEARCHED, Strategy, merge_to_file
from medforge_merger.mixture import MIXTURE_FILE, Mixture
from medforge_merger.search import FactorMap, SearchSettings, adapter_probs, dense, fusion, mixture
from medforge_merger.strategies import MergeError
from medforge_merger.tasks import TASKS_FILE, Task, from_contribution, load_bundle, save_bundle
from medforge_trainer.errors import TrainFailed
from medforge_trainer.sources import fetch_model_dir

JSON = dict[str, Any]
VERSION = "0.1.0"


class JobFailed(Exception):
    pass


def fetch(spec: JSON, dest: Path) -> None:
    """One input file, from a presigned URL or a local path, streamed to disk."""
    check_safe_name(spec["name"])  # pickle formats are refused before a byte is read
    target = dest / spec["name"]
    if "path" in spec:
        shutil.copyfile(spec["path"], target)
        return
    with urllib.request.urlopen(spec["url"], timeout=60) as r, target.open("wb") as out:  # noqa: S310
        shutil.copyfileobj(r, out, 1 << 20)


def put(url_or_path: str, source: Path) -> None:
    if url_or_path.startswith(("http://", "https://")):
        req = urllib.request.Request(url_or_path, data=source.read_bytes(), method="PUT")  # noqa: S310
        with urllib.request.urlopen(req, timeout=120) as r:  # noqa: S310
            if r.status not in (200, 201):
                raise JobFailed(f"upload of {source.name} answered HTTP {r.status}")
    else:
        shutil.copyfile(source, url_or_path)


def weight_for(item: JSON, weights: JSON) -> float:
    """spec.strategy.weights is keyed by namespace/name or by name; unnamed inputs weigh 1."""
    for key in (f"{item['namespace']}/{item['name']}", item["name"]):
        if key in weights:
            return float(weights[key])
    return 1.0


def _factor_map(ad: Adapter) -> FactorMap:
    return {m: ad.factors(m) for m in sorted(ad.shapes)}


def _composite_deltas(path: Path) -> Deltas:
    """Dense updates of a composite file written by merge_to_file (factors or deltas)."""
    out: Deltas = {}
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        for k in sorted(keys):
            if k.endswith(SUFFIX_DELTA):
                out[k[: -len(SUFFIX_DELTA)]] = f.get_tensor(k).float()
            elif k.endswith(SUFFIX_A):
                m = k[: -len(SUFFIX_A)]
                out[m] = f.get_tensor(m + SUFFIX_B).float() @ f.get_tensor(k).float()
    return out


def _load_current(
    item: JSON, d: Path, base_digest: str
) -> tuple[Adapter | None, Mixture | None, list[Task]]:
    """The current revision: a factor composite (an adapter with scale 1) or a mixture bundle,
    plus the distilled sets of the tasks it already holds."""
    for f in item["files"]:
        fetch(f, d)
    raw = (d / "manifest.json").read_bytes()
    if "sha256:" + hashlib.sha256(raw).hexdigest() != item["digest"]:
        raise InputRejected("manifest.json does not match the current revision's digest")
    manifest = Manifest.from_json(raw.decode(), "current/manifest.json")
    verify_dir(d, manifest)
    if manifest.base_model_digest != base_digest:
        raise InputRejected("the current revision was merged for another base model")
    tasks = load_bundle(d / TASKS_FILE) if (d / TASKS_FILE).is_file() else []
    if (d / MIXTURE_FILE).is_file():
        return None, Mixture.load(d / MIXTURE_FILE), tasks
    return (
        load_adapter(d, f"revision-{item.get('revision', '?')}", item["digest"], base_digest),
        None,
        tasks,
    )


def _evaluation_task(spec: JSON, task: Task, d: Path) -> Task:
    """An evaluation set given in the config: a safetensors file in the distilled sets' format
    (`images` normalised for the base model, `labels`), scored with `task`'s head."""
    files = spec.get("files") or []
    if len(files) != 1 or not str(files[0].get("name", "")).endswith(".safetensors"):
        raise JobFailed(f"evaluation for {task.name}: give exactly one .safetensors file")
    d.mkdir()
    fetch(files[0], d)
    path = d / files[0]["name"]
    if "sha256" in files[0] and sha256_file(path)[0] != files[0]["sha256"]:
        raise JobFailed(f"evaluation for {task.name}: {path.name} does not match its sha256")
    with safe_open(str(path), framework="pt") as f:
        images, labels = f.get_tensor("images").float(), f.get_tensor("labels").long()
    return Task(task.name, task.classes, task.head, images, labels, task.head_weights)


def _round(m: JSON) -> JSON:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}


def run(cfg: JSON, work: Path, output_dir: Path | None) -> JSON:
    base = cfg.get("baseModel") or {}
    base_digest = base["digest"]
    strat = cfg.get("strategy") or {}
    search_cfg = strat.get("search") or {}
    s = Strategy(
        strat.get("type", "linear"),
        strat.get("rank"),
        float(strat.get("density", 1.0)),
        int(search_cfg.get("seed", 0)),
    )
    search = SearchSettings(
        budget=int(search_cfg.get("budget", 40)),
        l1=float(search_cfg.get("l1", 0.05)),
        seed=s.seed,
    )
    report: list[JSON] = []
    loaded: list[tuple[Adapter, float, JSON]] = []
    current_adapter: Adapter | None = None
    current_mixture: Mixture | None = None
    tasks_so_far: list[Task] = []
    if cfg.get("current"):
        cur = cfg["current"]
        d = work / "current"
        d.mkdir()
        try:
            current_adapter, current_mixture, tasks_so_far = _load_current(cur, d, base_digest)
        except (InputRejected, ManifestError, OSError, KeyError) as exc:
            raise JobFailed(f"the current revision cannot be read: {exc}") from exc
        if (current_mixture is not None) != (s.type == "mixture"):
            raise JobFailed(
                f"the current revision was merged with another strategy than {s.type}; "
                "use integration: full to rebuild it"
            )
    for i, item in enumerate(cfg.get("inputs") or []):
        key = f"{item['namespace']}/{item['name']}".lstrip("/")
        entry = {"namespace": item["namespace"], "name": item["name"], "digest": item["digest"]}
        d = work / f"input-{i}"
        d.mkdir()
        try:
            for f in item["files"]:
                fetch(f, d)
            ad = load_adapter(d, key, item["digest"], base_digest)
        except (InputRejected, ManifestError, OSError) as exc:
            report.append(entry | {"state": "Excluded", "reason": str(exc)})
            print(f"excluded {key}: {exc}", flush=True)
            continue
        loaded.append((ad, weight_for(item, strat.get("weights") or {}), entry))
    everything = [a for a, _, _ in loaded] + ([current_adapter] if current_adapter else [])
    _, rejected = check_compatible(everything)
    if current_adapter is not None and current_adapter.key in rejected:
        raise JobFailed(f"the current revision cannot be used: {rejected[current_adapter.key]}")
    for ad, _, entry in loaded:
        if ad.key in rejected:
            report.append(entry | {"state": "Excluded", "reason": rejected[ad.key]})
    use = [(a, w, e) for a, w, e in loaded if a.key not in rejected]
    if not use:
        raise JobFailed(
            "no input passed verification: " + "; ".join(r.get("reason", "") for r in report)
        )

    # The base model, for scoring (and for the searched strategies, which need it).
    ev: Evaluator | None = None
    if base.get("files") or base.get("path"):
        try:
            base_dir = fetch_model_dir(
                base_digest, list(base.get("files") or []), base.get("path"), work / "base"
            )
            ev = Evaluator(base_dir)
        except TrainFailed as exc:
            raise JobFailed(str(exc)) from exc
    elif s.type in SEARCHED:
        raise JobFailed(f"strategy {s.type} searches on the base model: baseModel.files is empty")

    new_tasks: list[Task | None] = []
    for ad, _, _ in use:
        t = from_contribution(ad.path.parent, ad.meta)
        if t is not None and ev is not None:
            t.solo = _round(ev.metrics(t, dense(_factor_map(ad))))
        new_tasks.append(t)

    files: list[Path] = []
    coefficients: list[float] = [w for _, w, _ in use]
    meta_extra: JSON = {}
    t0 = time.monotonic()
    deltas: Deltas | None = None
    rank = 0
    if s.type in ("fusion", "fusion-exact"):
        assert ev is not None
        exact = s.type == "fusion-exact"
        arrivals = [(_factor_map(a), t) for (a, _, _), t in zip(use, new_tasks, strict=True)]
        if current_adapter is not None:
            theta = _factor_map(current_adapter)
        else:
            theta, first_task = arrivals.pop(0)
            if first_task is not None:
                tasks_so_far.append(first_task)
        theta, steps = fusion(ev, theta, arrivals, tasks_so_far, search, exact)
        # Each input's effective weight on its own update (exact for fusion-exact).
        weights = [] if current_adapter is not None else [1.0]
        for st_ in steps:
            weights = [st_.a * w for w in weights] + [st_.b]
        coefficients = weights
        meta_extra["steps"] = [
            {"a": round(x.a, 6), "b": round(x.b, 6), "loss": round(x.loss, 6)} for x in steps
        ]
        tensors = {}
        for m, f in theta.items():
            tensors[m + SUFFIX_A] = f.A.contiguous()
            tensors[m + SUFFIX_B] = f.B.contiguous()
            rank = max(rank, f.rank)
        save_file(
            tensors,
            str(work / ADAPTER_FILE),
            metadata={"format": "medforge-composite", "strategy": s.type},
        )
        files.append(work / ADAPTER_FILE)
        deltas = dense(theta)
    elif s.type == "mixture":
        assert ev is not None
        tasks_so_far += [t for t in new_tasks if t is not None]
        if not tasks_so_far:
            raise JobFailed("mixture needs at least one distilled set to search on")
        adapters = (current_mixture.adapters if current_mixture else []) + [
            _factor_map(a) for a, _, _ in use
        ]
        sources = (current_mixture.sources if current_mixture else []) + [
            e["namespace"] + "/" + e["name"] for _, _, e in use
        ]
        q = [adapter_probs(ev, dense(f), tasks_so_far) for f in adapters]
        start = current_mixture.coefficients if current_mixture else []
        weights, steps = mixture(q, start, tasks_so_far, search, len(start))
        mix = Mixture(adapters, weights, sources)
        mix.save(work / MIXTURE_FILE)
        files.append(work / MIXTURE_FILE)
        coefficients = weights[len(start) :]
        meta_extra["coefficients"] = [round(w, 6) for w in weights]
        meta_extra["sources"] = sources
        meta_extra["steps"] = [
            {"a": round(x.a, 6), "b": round(x.b, 6), "loss": round(x.loss, 6)} for x in steps
        ]
    else:
        merged = [a for a, _, _ in use]
        ws = [w for _, w, _ in use]
        if current_adapter is not None:
            merged.insert(0, current_adapter)
            ws.insert(0, 1.0)
        rank = merge_to_file(merged, ws, s, work / ADAPTER_FILE)
        files.append(work / ADAPTER_FILE)
        tasks_so_far += [t for t in new_tasks if t is not None]
        if ev is not None and tasks_so_far:
            deltas = _composite_deltas(work / ADAPTER_FILE)
    print(f"merged {len(use)} input(s) with {s.type} in {time.monotonic() - t0:.2f} s", flush=True)

    # Scores of the composite on every task's distilled set, and regressions against the
    # revision it replaces.
    metrics: JSON = {}
    if ev is not None:
        for t in tasks_so_far:
            if s.type == "mixture":
                score = classification_metrics(t.labels, mix.probabilities(ev, t))
            else:
                score = ev.metrics(t, deltas or {})
            metrics[t.name] = _round(score) | (
                {"solo": t.solo["accuracy"]} if "accuracy" in t.solo else {}
            )
        for i, spec in enumerate(cfg.get("evaluation") or []):
            name = spec.get("task")
            task = next((t for t in tasks_so_far if t.name == name), None)
            if task is None:
                raise JobFailed(f"evaluation[{i}].task: {name!r} is not among the merged tasks")
            held = _evaluation_task(spec, task, work / f"evaluation-{i}")
            if s.type == "mixture":
                score = classification_metrics(held.labels, mix.probabilities(ev, held))
            else:
                score = ev.metrics(held, deltas or {})
            metrics[task.name]["evaluation"] = _round(score)
    previous = (cfg.get("previous") or cfg.get("current") or {}).get("metrics") or {}
    regression = {
        name: round(float(prev["accuracy"]) - float(metrics[name]["accuracy"]), 4)
        for name, prev in previous.items()
        if isinstance(prev, dict) and "accuracy" in prev and name in metrics
    }
    if tasks_so_far:
        save_bundle(tasks_so_far, work / TASKS_FILE)
        files.append(work / TASKS_FILE)

    included = [
        e | {"state": "Included", "coefficient": round(c, 6)}
        for (_, _, e), c in zip(
            use, coefficients[-len(use) :] if coefficients else [1.0] * len(use), strict=True
        )
    ]
    manifest = Manifest(
        "composite",
        base_digest,
        [],
        {
            "strategy": s.type,
            "scale": 1.0,  # folded into the B factors
            "maxRank": rank or None,
            "density": s.density,
            "seed": s.seed,
            "search": {"budget": search.budget, "l1": search.l1, "seed": search.seed}
            if s.type in SEARCHED
            else None,
            "integration": cfg.get("integration", "full"),
            "inputs": included,
            "metrics": metrics,
            "tasks": [t.name for t in tasks_so_far],
            "tool": f"medforge-merge {VERSION}",
            **meta_extra,
        },
    )
    entries = [manifest.add_file(p) for p in files]
    manifest_path = work / "manifest.json"
    manifest_path.write_text(manifest.to_json())
    outputs = (cfg.get("output") or {}).get("files") or {}
    for path in [*files, manifest_path]:
        if output_dir is not None:
            put(str(output_dir / path.name), path)
        elif path.name in outputs:
            put(outputs[path.name], path)
        else:
            raise JobFailed(f"the job config has no output URL for {path.name}")
    scores = [float(m["accuracy"]) for m in metrics.values()]
    result: JSON = {
        "artifact": {
            "uri": (cfg.get("output") or {}).get("uri", str(output_dir)),
            "digest": "sha256:" + hashlib.sha256(manifest_path.read_bytes()).hexdigest(),
            "sizeBytes": sum(e.size for e in entries),
        },
        "inputs": included + report,
        "metrics": metrics,
        "regression": regression,
        "integration": cfg.get("integration", "full"),
    }
    if scores:
        result["score"] = round(sum(scores) / len(scores), 4)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="medforge-merge", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="job config JSON file (default: $MEDFORGE_JOB_CONFIG)")
    p.add_argument("--output-dir", help="write the composite here instead of the config's URLs")
    p.add_argument(
        "--termination-log", default=os.environ.get("MEDFORGE_TERMINATION_LOG", str(DEFAULT_PATH))
    )
    args = p.parse_args(argv)
    term = Path(args.termination_log)

    def finish(text: str, code: int) -> int:
        # Run by hand there may be no termination-message path: stdout says it all.
        with contextlib.suppress(OSError):
            term.write_text(text)
        print(text, file=sys.stdout if code == 0 else sys.stderr)
        return code

    try:
        raw = Path(args.config).read_text() if args.config else os.environ["MEDFORGE_JOB_CONFIG"]
        cfg = json.loads(raw)
    except (KeyError, OSError, json.JSONDecodeError) as exc:
        return finish(
            failure_line(
                f"no readable job config ({exc}); pass --config or set MEDFORGE_JOB_CONFIG"
            ),
            2,
        )
    out_dir = Path(args.output_dir) if args.output_dir else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    if os.environ.get("TMPDIR"):  # the Job's scratch emptyDir: the root filesystem is read-only
        Path(os.environ["TMPDIR"]).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="medforge-merge-") as tmp:
        try:
            result = run(cfg, Path(tmp), out_dir)
        except (JobFailed, MergeError, ManifestError, EvaluationError, KeyError) as exc:
            return finish(failure_line(f"merge failed: {exc}"), 1)
        except MemoryError:
            return finish(
                failure_line("merge failed: out of memory; give the merge Job more memory"), 1
            )
    return finish(encode_result(result), 0)


if __name__ == "__main__":
    sys.exit(main())
