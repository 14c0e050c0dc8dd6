"""The merge Job's config, checked and typed at the edge (as the trainer's TrainConfig): a
missing or malformed field is named here (exit 2), never a KeyError in the middle of a merge.
The operator writes it (composite.merge_plan); by hand, a forge writes the same JSON with local
paths (`baseModel.path`, `inputs[].files[].path`, `--output-dir`)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from medforge_common import strategy
from medforge_common.result import JobConfigError
from medforge_merger.registry import Strategy

JSON = dict[str, Any]
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
INTEGRATIONS = ("full", "incremental")


class ConfigError(JobConfigError):
    """A merge config that cannot be used; the message names the field."""


@dataclass(frozen=True)
class SearchSettings:
    budget: int = 40
    l1: float = 0.05
    seed: int = 0


@dataclass(frozen=True)
class MergeConfig:
    strategy: Strategy
    base: JSON  # {name?, digest, files: [{name, url|path}], path?}
    inputs: list[JSON]  # [{namespace, name, digest, new, task?, files}]
    integration: str = "full"
    search: SearchSettings = field(default_factory=SearchSettings)
    scale_given: bool = False  # spec.strategy.scale set: the subspace scale is not searched
    weights: JSON = field(default_factory=dict)  # namespace/name or name -> weight
    gate: JSON = field(default_factory=dict)
    current: JSON | None = None  # the revision merged into (incremental)
    previous_metrics: JSON = field(default_factory=dict)  # of the revision replaced
    evaluation: list[JSON] = field(default_factory=list)
    output_uri: str = ""
    output_files: dict[str, str] = field(default_factory=dict)
    # spec.signing: the forge's mounted private key; `record` keeps the plan's own words
    # (composite, strategy as written, the parent revision) for the signed statement.
    signing_key: str | None = None
    record: JSON = field(default_factory=dict)
    # spec.branches.rank: inputs merged relative to their parent re-compressed to this rank.
    branch_rank: int | None = None

    @property
    def base_digest(self) -> str:
        return str(self.base["digest"])


def _obj(parent: JSON, key: str, path: str, required: bool = False) -> JSON:
    value = parent.get(key)
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        got = "nothing" if value is None else type(value).__name__
        raise ConfigError(f"{path}{key}: expected an object, got {got}")
    return value


def _list(parent: JSON, key: str, path: str) -> list[Any]:
    value = parent.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{path}{key}: expected a list, got {type(value).__name__}")
    return value


def _num(section: JSON, key: str, path: str, default: float, lo: float, hi: float) -> float:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{path}{key}: expected a number, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"{path}{key}: {value!r} is outside [{lo}, {hi}]")
    return float(value)


def _int(section: JSON, key: str, path: str, default: int, lo: int, hi: int) -> int:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{path}{key}: expected an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"{path}{key}: {value!r} is outside [{lo}, {hi}]")
    return value


def _digest(section: JSON, path: str) -> str:
    value = section.get("digest")
    if not isinstance(value, str) or not DIGEST.fullmatch(value):
        raise ConfigError(f"{path}digest: expected sha256:<64 hex digits> of its manifest.json")
    return value


def _files(section: JSON, path: str) -> list[JSON]:
    files = _list(section, "files", path)
    for i, f in enumerate(files):
        if not (
            isinstance(f, dict)
            and isinstance(f.get("name"), str)
            and isinstance(f.get("url", f.get("path")), str)
        ):
            raise ConfigError(f"{path}files[{i}]: expected {{name, url}} or {{name, path}}")
    return files


def _strategy(cfg: JSON) -> tuple[Strategy, SearchSettings, JSON, bool]:
    strat = _obj(cfg, "strategy", "")
    name = strat.get("type", "linear")
    try:
        strategy.traits(str(name))
    except strategy.UnknownStrategy as exc:
        raise ConfigError(str(exc)) from None
    rank = strat.get("rank")
    if rank is not None:
        rank = _int(strat, "rank", "strategy.", 1, 1, 1 << 16)
    search = _obj(strat, "search", "strategy.")
    settings = SearchSettings(
        budget=_int(search, "budget", "strategy.search.", 40, 1, 1_000_000),
        l1=_num(search, "l1", "strategy.search.", 0.05, 0.0, 1e6),
        seed=_int(search, "seed", "strategy.search.", 0, 0, 2**32 - 1),
    )
    weights = _obj(strat, "weights", "strategy.")
    for key, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w):
            raise ConfigError(f"strategy.weights[{key!r}]: expected a number, got {w!r}")
    s = Strategy(
        str(name),
        rank,
        _num(strat, "density", "strategy.", 1.0, 0.0, 1.0),
        settings.seed,
        _num(strat, "scale", "strategy.", 1.0, 0.0, 1e6),
    )
    if s.density == 0.0:
        raise ConfigError("strategy.density: must be above 0")
    return s, settings, weights, "scale" in strat


def _inputs(cfg: JSON) -> list[JSON]:
    out = []
    for i, item in enumerate(_list(cfg, "inputs", "")):
        path = f"inputs[{i}]."
        if not isinstance(item, dict):
            raise ConfigError(f"inputs[{i}]: expected an object, got {type(item).__name__}")
        for key in ("namespace", "name", "digest"):
            if not isinstance(item.get(key), str) or not (item[key] or key == "namespace"):
                raise ConfigError(f"{path}{key}: expected a non-empty string")
        # A digest that its manifest does not match refuses that input alone (a verdict on
        # it, reported), not the whole merge.
        _files(item, path)
        if item.get("parent") is not None:
            _parent(item["parent"], f"{path}parent.")
        out.append(item)
    return out


def _parent(parent: Any, path: str) -> None:
    """An input trained from a composite revision (spec.startFrom): which one, and how many
    revisions the composite has moved on since (its staleness)."""
    if not isinstance(parent, dict):
        raise ConfigError(f"{path[:-1]}: expected {{revision, digest, stale}}")
    _int(parent, "revision", path, 0, 1, 2**31)
    _digest(parent, path)
    _int(parent, "stale", path, 0, 0, 2**31)


def _current(cfg: JSON) -> JSON | None:
    if not cfg.get("current"):
        return None
    current = _obj(cfg, "current", "")
    if not isinstance(current.get("digest"), str):
        raise ConfigError("current.digest: expected the current revision's manifest digest")
    _files(current, "current.")
    return current


def parse(raw: Any) -> MergeConfig:
    """Check the whole config and return it typed, or raise ConfigError naming the field."""
    if not isinstance(raw, dict):
        raise ConfigError("the job config must be a JSON object")
    base = _obj(raw, "baseModel", "", required=True)
    _digest(base, "baseModel.")
    _files(base, "baseModel.")
    if "path" in base and not isinstance(base["path"], str):
        raise ConfigError("baseModel.path: expected a directory path")
    s, search, weights, scale_given = _strategy(raw)
    integration = raw.get("integration", "full")
    if integration not in INTEGRATIONS:
        raise ConfigError(f"integration: {integration!r} is not one of {', '.join(INTEGRATIONS)}")
    out = _obj(raw, "output", "")
    out_files = _obj(out, "files", "output.")
    if not all(isinstance(v, str) for v in out_files.values()):
        raise ConfigError("output.files: expected a map of file name to presigned PUT URL")
    previous = raw.get("previous") or raw.get("current") or {}
    metrics = previous.get("metrics") if isinstance(previous, dict) else None
    evaluation = _list(raw, "evaluation", "")
    for i, e in enumerate(evaluation):
        if not isinstance(e, dict):
            raise ConfigError(f"evaluation[{i}]: expected an object, got {type(e).__name__}")
    signing = _obj(raw, "signing", "")
    key = signing.get("keyFile")
    if signing and not isinstance(key, str):
        raise ConfigError("signing.keyFile: expected the path of the mounted private key")
    record = {k: raw[k] for k in ("composite", "strategy", "previous") if k in raw}
    if isinstance(raw.get("current"), dict):  # incremental: the revision this one builds on
        record["parent"] = {k: raw["current"].get(k) for k in ("revision", "digest")}
    return MergeConfig(
        strategy=s,
        base=base,
        inputs=_inputs(raw),
        integration=str(integration),
        search=search,
        scale_given=scale_given,
        weights=weights,
        gate=_obj(raw, "gate", ""),
        current=_current(raw),
        previous_metrics=dict(metrics) if isinstance(metrics, dict) else {},
        evaluation=evaluation,
        output_uri=str(out.get("uri") or ""),
        output_files=dict(out_files),
        signing_key=key if isinstance(key, str) else None,
        record=record,
        branch_rank=_branch_rank(raw),
    )


def _branch_rank(raw: JSON) -> int | None:
    branches = _obj(raw, "branches", "")
    if branches.get("rank") is None:
        return None
    return _int(branches, "rank", "branches.", 0, 1, 4096)
