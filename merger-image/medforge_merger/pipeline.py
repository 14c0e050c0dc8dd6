"""The merge pipeline: verified inputs, a streamed merge, the composite and its manifest out
(presigned PUT URLs, or a directory by hand), the full result beside it. `__main__` parses the
arguments and runs this in the shared job scaffold (medforge_ml.job)."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medforge_common import gate, strategy
from medforge_common.api import InputReason, InputState, Reason
from medforge_common.artifacts import ADAPTER_FILE, MANIFEST_FILE, MIXTURE_FILE, RESULT_FILE
from medforge_common.contract import ResultReference
from medforge_common.manifest import Manifest, ManifestError, digest_of, verify_dir
from medforge_common.result import failure_line, result_reference
from medforge_common.strategy import Family
from medforge_merger import attest, blame, stacking
from medforge_merger.adapters import Adapter, InputRejected, load_adapter
from medforge_merger.config import MergeConfig
from medforge_merger.inputs import (
    Loaded,
    StoreFault,
    compatible,
    exclude,
    fetch,
    fetch_artifact,
    read_inputs,
)
from medforge_merger.merge import merge_to_file
from medforge_merger.registry import DEFAULT_REGISTRY, Strategy
from medforge_ml import transfers
from medforge_ml.transfers import StoreError

if TYPE_CHECKING:
    from medforge_merger.scoring import Scorer

JSON = dict[str, Any]
VERSION = "0.1.0"


class JobFailed(Exception):
    pass


class NoUsableInput(Exception):
    def __init__(self, report: list[JSON]) -> None:
        super().__init__(
            "no input passed verification: " + "; ".join(r.get("reason", "") for r in report)
        )
        self.report = report


def put(url_or_path: str, source: Path) -> None:
    if url_or_path.startswith(("http://", "https://")):
        try:
            transfers.upload(url_or_path, source, source.name)
        except StoreError as exc:
            raise StoreFault(str(exc)) from exc
    else:
        shutil.copyfile(source, url_or_path)


def _load_current(item: JSON, d: Path, base_digest: str) -> Adapter | None:
    """The current revision, verified: a factor composite (an adapter with scale 1), or None
    for a mixture bundle (which only the torch side reads)."""
    fetch_artifact(item, d)
    raw = (d / MANIFEST_FILE).read_bytes()
    manifest = Manifest.from_json(raw.decode(), "current/manifest.json")
    verify_dir(d, manifest)
    if manifest.base_model_digest != base_digest:
        raise InputRejected("the current revision was merged for another base model")
    if (d / MIXTURE_FILE).is_file():
        return None
    return load_adapter(d, f"revision-{item.get('revision', '?')}", item["digest"], base_digest)


@dataclass
class Merged:
    """What the merge step wrote and how it weighed the inputs."""

    files: list[Path]
    coefficients: list[float]
    rank: int
    meta: JSON = field(default_factory=dict)


def _family(s: Strategy) -> Family:
    return DEFAULT_REGISTRY.family(s)


def _scorer(cfg: MergeConfig, work: Path) -> Scorer | None:
    """torch and the base model only when something needs them: an exact merge without a base
    model to score on stays numpy-only."""
    base = cfg.base
    if _family(cfg.strategy) is Family.SEARCHED or base.get("files") or base.get("path"):
        from medforge_merger.scoring import Scorer

        return Scorer(base, base["digest"], work, fetch)
    return None


def _current(cfg: MergeConfig, work: Path, scorer: Scorer | None) -> Adapter | None:
    """The revision this one merges into (incremental), verified, or None."""
    if cfg.current is None:
        return None
    d = work / "current"
    d.mkdir()
    try:
        current = _load_current(cfg.current, d, cfg.base_digest)
    except (InputRejected, ManifestError, OSError, KeyError) as exc:
        raise JobFailed(f"the current revision cannot be read: {exc}") from exc
    if (current is None) != (cfg.strategy.type == "mixture"):
        raise JobFailed(
            f"the current revision was merged with another strategy than {cfg.strategy.type}; "
            "use integration: full to rebuild it"
        )
    if scorer is not None:
        scorer.load_current(d)
    return current


def _merge(
    cfg: MergeConfig, use: Loaded, current: Adapter | None, scorer: Scorer | None, work: Path
) -> Merged:
    """The inputs that start from the base model merged by the strategy (into the current
    revision, incremental), then those trained from a revision added to that exactly."""
    base = [u for u in use if not u[2].get("parent")]
    relative = [u[0] for u in use if u[2].get("parent")]
    if not relative:
        return _merge_base(cfg, base, current, scorer, work)
    if base:
        merged = _merge_base(cfg, base, current, scorer, work)
        onto: Path | None = work / ADAPTER_FILE
    else:
        merged = Merged([], [], 0)
        onto = current.path if current is not None else None
    out = work / ADAPTER_FILE
    rank = stacking.stack_onto(onto, relative, out, cfg.branch_rank)
    if scorer is not None:
        scorer.exact(relative, out)
    meta = merged.meta | ({"branchRank": cfg.branch_rank} if cfg.branch_rank else {})
    files = [out, *(p for p in merged.files if p.name != ADAPTER_FILE)]
    return Merged(files, merged.coefficients + [1.0] * len(relative), rank, meta)


def _merge_base(
    cfg: MergeConfig, use: Loaded, current: Adapter | None, scorer: Scorer | None, work: Path
) -> Merged:
    s = cfg.strategy  # its scale may be searched below
    if _family(s) is Family.SEARCHED:
        from medforge_merger.search import SearchSettings

        if scorer is None:
            raise JobFailed(f"strategy {s.type} searches on the base model: baseModel is empty")
        search = SearchSettings(budget=cfg.search.budget, l1=cfg.search.l1, seed=s.seed)
        named = [(a, f"{e['namespace']}/{e['name']}") for a, _, e in use]
        scored = scorer.searched(s.type, current, named, search, work)
        return Merged(
            list(scored.files),
            scored.coefficients or [w for _, w, _ in use],
            scored.rank,
            scored.meta
            | {"search": {"budget": search.budget, "l1": search.l1, "seed": search.seed}},
        )
    merged = [a for a, _, _ in use]
    weights = [w for _, w, _ in use]
    if current is not None:
        if not strategy.traits(s.type).takes_parent:
            raise JobFailed(f"strategy {s.type} merges every input afresh: use integration: full")
        merged.insert(0, current)
        weights.insert(0, 1.0)
    rank = merge_to_file(merged, weights, s, work / ADAPTER_FILE)
    meta: JSON = {}
    if scorer is not None:
        scorer.exact([a for a, _, _ in use], work / ADAPTER_FILE)
        if _family(s) is Family.SUBSPACE and not cfg.scale_given and scorer.tasks:
            from medforge_merger.search import SearchSettings

            settings = SearchSettings(budget=cfg.search.budget, seed=s.seed)
            s = replace(s, scale=scorer.search_scale(settings))
            rank = merge_to_file(merged, weights, s, work / ADAPTER_FILE)  # at the found scale
            meta["search"] = {"budget": settings.budget, "seed": settings.seed}
    if _family(s) is Family.SUBSPACE:
        meta["scale"] = round(s.scale, 6)
    return Merged([work / ADAPTER_FILE], [w for _, w, _ in use], rank, meta)


def _score(cfg: MergeConfig, scorer: Scorer | None, work: Path) -> tuple[JSON, JSON]:
    """(metrics on every task's distilled set, regressions against the revision replaced)."""
    if cfg.evaluation and scorer is None:
        raise JobFailed("evaluation sets need the base model: baseModel.files is empty")
    metrics: JSON = scorer.metrics(cfg.evaluation, work) if scorer else {}
    previous = cfg.previous_metrics
    regression = {
        name: round(float(prev["accuracy"]) - float(metrics[name]["accuracy"]), 4)
        for name, prev in previous.items()
        if isinstance(prev, dict) and "accuracy" in prev and name in metrics
    }
    return metrics, regression


def _check_finite(files: list[Path]) -> None:
    """Nothing with NaN or Inf leaves the merge Job: every tensor of every file is checked
    before the first upload."""
    import numpy as np
    from safetensors import safe_open

    for path in files:
        if path.suffix != ".safetensors":
            continue
        with safe_open(str(path), framework="np") as f:
            for key in f.keys():  # noqa: SIM118  (safe_open is not a mapping)
                if not np.isfinite(f.get_tensor(key)).all():
                    raise JobFailed(
                        f"the merged {path.name} holds NaN or Inf in {key}; nothing was uploaded"
                    )


def _publish(
    cfg: MergeConfig, manifest: Manifest, files: list[Path], work: Path, output_dir: Path | None
) -> JSON:
    """Upload the files and their manifest; the artifact part of the result."""
    _check_finite(files)
    entries = [manifest.add_file(p) for p in files]
    manifest_path = work / MANIFEST_FILE
    manifest_path.write_text(manifest.to_json())
    for path in [*files, manifest_path]:
        _upload(cfg, path, output_dir)
    return {
        "uri": cfg.output_uri or str(output_dir),
        "digest": digest_of(manifest_path.read_bytes()),
        "sizeBytes": sum(e.size for e in entries),
    }


def _upload(cfg: MergeConfig, path: Path, output_dir: Path | None) -> None:
    if output_dir is not None:
        put(str(output_dir / path.name), path)
    elif path.name in cfg.output_files:
        put(cfg.output_files[path.name], path)
    else:
        raise JobFailed(f"the job config has no output URL for {path.name}")


def _public(entry: JSON) -> JSON:
    """An input's entry as the result reports it (without the merge's own bookkeeping)."""
    return {k: v for k, v in entry.items() if k != "new"}


def _figures(merged: Merged, seconds: float, inputs: int) -> JSON:
    """The merge's own figures, which the operator exports as metrics."""
    search = merged.meta.get("search") or {}
    steps = merged.meta.get("steps") or []
    return {
        "seconds": round(seconds, 3),
        "inputs": inputs,
        # Each searched step asks the optimiser for `budget` points.
        "searchEvaluations": int(search.get("budget", 0)) * len(steps),
    }


def _merge_and_blame(
    cfg: MergeConfig,
    use: Loaded,
    current: Adapter | None,
    scorer: Scorer | None,
    work: Path,
    report_: list[JSON],
) -> tuple[Merged, JSON, JSON, Loaded]:
    """Merge and score; when that regresses the gate's tasks and several new inputs arrived
    together, leave each out once and exclude those the regression is due to, then merge the
    rest. (merged, metrics, regression, the inputs merged)."""
    start = scorer.snapshot() if scorer is not None else None

    def attempt(inputs: Loaded, evaluate: bool = True) -> tuple[Merged, JSON, JSON]:
        if scorer is not None and start is not None:
            scorer.restore(start)  # every attempt from the same tasks and state
        merged = _merge(cfg, inputs, current, scorer, work)
        # A left-out input may own the task an evaluation set names: the gate reads the
        # distilled sets only, so the extra merges skip the evaluation sets.
        return (merged, *_score(cfg if evaluate else replace(cfg, evaluation=[]), scorer, work))

    merged, metrics, regression = attempt(use)
    rule = gate.Rule.from_spec(cfg.gate)
    blamed = blame.leave_one_out(
        cfg.previous_metrics,
        rule,
        [e for _, _, e in use],
        metrics,
        lambda left: attempt([u for u in use if u[2] is not left], evaluate=False)[1],
    )
    if not blamed:
        return merged, metrics, regression, use
    for _, _, e in use:
        if e["digest"] in blamed:
            tasks = ", ".join(blamed[e["digest"]])
            why = f"the revision regresses significantly with it and not without it: {tasks}"
            exclude(report_, e, why, code="RejectedByGate")
    use = [u for u in use if u[2]["digest"] not in blamed]
    if not use:
        raise NoUsableInput(report_)
    return (*attempt(use), use)


def _parents_fit(cfg: MergeConfig, use: Loaded, report_: list[JSON]) -> Loaded:
    """Inputs trained from a revision, last (their updates go on top) and never into a mixture:
    an output-level mixture is no single model to have learnt on."""
    relative = [u for u in use if u[2].get("parent")]
    if cfg.strategy.type == "mixture":
        for _, _, e in relative:
            why = "trained from a revision, which a mixture cannot merge relative to"
            exclude(report_, e, why, code=InputReason.PARENT_IS_MIXTURE)
        relative = []
    return [u for u in use if not u[2].get("parent")] + relative


def run(cfg: MergeConfig, work: Path, output_dir: Path | None) -> JSON:
    """Verify and screen the inputs, merge, score (finding whom a regression is due to),
    upload; the result JSON."""
    s = cfg.strategy
    scorer = _scorer(cfg, work)
    report_: list[JSON] = []
    current = _current(cfg, work, scorer)
    use = compatible(read_inputs(cfg, work, report_, scorer), current, report_)
    use = _parents_fit(cfg, use, report_)
    if not use:
        raise NoUsableInput(report_)
    t0 = time.monotonic()
    merged, metrics, regression, use = _merge_and_blame(cfg, use, current, scorer, work, report_)
    merge_seconds = time.monotonic() - t0
    print(f"merged {len(use)} input(s) with {s.type} in {merge_seconds:.2f} s", flush=True)
    bundle = scorer.save_tasks(work) if scorer else None
    files = [*merged.files, *([bundle] if bundle is not None else [])]
    included = [
        _public(e) | {"state": InputState.INCLUDED, "coefficient": round(c, 6)}
        for (_, _, e), c in zip(use, merged.coefficients[-len(use) :], strict=True)
    ]
    manifest = Manifest(
        "composite",
        cfg.base_digest,
        [],
        {
            "strategy": s.type,
            "scale": 1.0,  # folded into the B factors
            "maxRank": merged.rank or None,
            "density": s.density,
            "seed": s.seed,
            "integration": cfg.integration,
            "inputs": included,
            "metrics": metrics,
            "tasks": list(metrics),
            "tool": f"medforge-merge {VERSION}",
            **merged.meta,
        },
    )
    result: JSON = {
        "artifact": _publish(cfg, manifest, files, work, output_dir),
        "inputs": included + [_public(e) for e in report_],
        "metrics": metrics,
        "regression": regression,
        "integration": cfg.integration,
        "merge": _figures(merged, merge_seconds, len(use)),
    }
    if metrics:
        scores = [float(m["accuracy"]) for m in metrics.values()]
        result["score"] = round(sum(scores) / len(scores), 4)
    if cfg.signing_key:  # the forge signs what it uploaded (spec.signing)
        signed = [*files, work / MANIFEST_FILE]
        _upload(cfg, attest.sign_revision(cfg, result, signed, work), output_dir)
    return result


def verdict(cfg: MergeConfig, exc: NoUsableInput, work: Path, output_dir: Path | None) -> str:
    """The termination message of a merge whose every input was refused: one JSON line naming
    the verdict, with the per-input report in result.json beside it (if it can be written)."""
    line: JSON = {"verdict": Reason.NO_USABLE_INPUT, "message": failure_line(str(exc))[:1000]}
    try:
        report_ = [_public(e) for e in exc.report]
        ref = publish_result(cfg, {"artifact": {}, "inputs": report_}, work, output_dir)
        line["resultFile"] = ref["resultFile"]
    except (JobFailed, StoreFault) as err:  # the report then stays in the message alone
        line["message"] = failure_line(f"{exc}; {err}")[:1000]
    return json.dumps(line, sort_keys=True)


def publish_result(
    cfg: MergeConfig, result: JSON, work: Path, output_dir: Path | None
) -> ResultReference:
    """The full result as result.json next to the composite; the small reference that the
    termination message carries (4 KiB would hold only about 20 inputs' entries)."""
    body = json.dumps(result, sort_keys=True, separators=(",", ":")).encode()
    path = work / RESULT_FILE
    path.write_bytes(body)
    _upload(cfg, path, output_dir)
    return result_reference(result, body, RESULT_FILE)
