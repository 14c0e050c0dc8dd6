"""A merge config that cannot be used is refused before any work (exit 2), in one line that
names the field, and nothing is written; before, a missing key became "merge failed"."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from medforge_common.api import ExitCode
from medforge_merger import config
from medforge_merger.__main__ import main as merge_main
from tests.merge_helpers import BASE

pytestmark = pytest.mark.unit

GOOD: dict[str, Any] = {
    "kind": "merge",
    "baseModel": {"digest": BASE, "files": []},
    "integration": "full",
    "strategy": {"type": "ties", "density": 0.5, "search": {"seed": 3}, "weights": {"h/a": 2}},
    "inputs": [
        {
            "namespace": "h",
            "name": "a",
            "digest": BASE,
            "files": [{"name": "manifest.json", "path": "/nowhere/manifest.json"}],
        }
    ],
    "gate": {"maxRegression": 0.02},
    "previous": {"revision": 2, "metrics": {"t": {"accuracy": 0.9}}},
}


def changed(path: str, value: Any) -> dict[str, Any]:
    """GOOD with the value at a dotted path (list indices as numbers) replaced; None deletes."""
    cfg = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node: Any = cfg
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    key: Any = int(last) if isinstance(node, list) else last
    if value is None:
        del node[key]
    else:
        node[key] = value
    return cfg


def test_a_good_config_is_typed() -> None:
    cfg = config.parse(GOOD)
    assert cfg.strategy.type == "ties" and cfg.strategy.density == 0.5 and cfg.strategy.seed == 3
    assert cfg.search.budget == 40 and cfg.weights == {"h/a": 2} and not cfg.scale_given
    assert cfg.base_digest == BASE and cfg.previous_metrics == {"t": {"accuracy": 0.9}}
    assert cfg.current is None and cfg.integration == "full"


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("baseModel", None, "baseModel: expected an object"),
        ("baseModel.digest", "sha256:short", "baseModel.digest"),
        ("baseModel.files", [{"name": "config.json"}], "baseModel.files[0]"),
        ("strategy.type", "lienar", "strategy.type: unknown strategy 'lienar'"),
        ("strategy.density", "half", "strategy.density: expected a number"),
        ("strategy.density", 1.5, "strategy.density: 1.5 is outside"),
        ("strategy.rank", "4", "strategy.rank: expected an integer"),
        ("strategy.search.budget", 0, "strategy.search.budget: 0 is outside"),
        ("strategy.weights", {"h/a": "heavy"}, "strategy.weights['h/a']"),
        ("integration", "partial", "integration: 'partial' is not one of"),
        ("inputs", {"h/a": {}}, "inputs: expected a list"),
        ("inputs.0.name", None, "inputs[0].name: expected a non-empty string"),
        ("inputs.0.digest", 7, "inputs[0].digest"),
        ("inputs.0.files", [{"name": "adapter.safetensors", "url": 3}], "inputs[0].files[0]"),
        ("current", {"files": []}, "current.digest"),
        ("output.files", {"adapter.safetensors": 1}, "output.files"),
        ("evaluation", ["t"], "evaluation[0]: expected an object"),
    ],
)
def test_a_bad_field_is_named_and_nothing_is_written(
    tmp_path: Path, path: str, value: Any, field: str
) -> None:
    with pytest.raises(config.ConfigError, match=field.replace("[", r"\[").replace("(", r"\(")):
        config.parse(changed(path, value))
    (tmp_path / "job.json").write_text(json.dumps(changed(path, value)))
    term = tmp_path / "term"
    args = ["--config", str(tmp_path / "job.json"), "--output-dir", str(tmp_path / "out")]
    assert merge_main([*args, "--termination-log", str(term)]) == ExitCode.BAD_CONFIG
    message = term.read_text()
    assert field in message and "\n" not in message, message
    assert not (tmp_path / "out").exists()
