"""Contributions trained from a composite revision (spec.startFrom), merged by `medforge-merge`
relative to it: the revision's update plus theirs, exactly, whatever the strategy does with
contributions from the base model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from medforge_merger import stacking
from medforge_merger.adapters import load_adapter
from medforge_merger.config import ConfigError, parse
from medforge_merger.pipeline import _parents_fit
from tests.merge_helpers import BASE, MODULES, dense, files, make_adapter
from tests.unit.test_merge_job import config, entry, load, run_merge


def delta(path: Path, module: str) -> torch.Tensor:
    t = load(path)
    if f"{module}.delta.weight" in t:
        return t[f"{module}.delta.weight"].double()
    return t[f"{module}.lora_B.weight"].double() @ t[f"{module}.lora_A.weight"].double()


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> bool:
    return float((a - b).abs().max() / b.abs().max()) < tol


def first_revision(tmp: Path, strategy: str) -> tuple[str, Path, list[dict[str, Any]]]:
    made = [make_adapter(tmp / f"a{i}", 4, i) for i in range(2)]
    inputs = [entry(f"a{i}", d, tmp / f"a{i}") for i, (d, _) in enumerate(made)]
    code, term, rev1 = run_merge(tmp, config(inputs, type=strategy, density=0.5), "rev1")
    assert code == 0, term
    return json.loads(term)["artifact"]["digest"], rev1, inputs


def relative(tmp: Path, digest: str, stale: int = 0, rank: int = 8) -> tuple[Any, Any]:
    d, t = make_adapter(tmp / "branch", rank, 11)
    item = entry("branch", d, tmp / "branch")
    item["parent"] = {"revision": 1, "digest": digest, "stale": stale}
    return item, t


def test_incremental_revision_is_its_parent_plus_the_update(tmp_path: Path) -> None:
    digest, rev1, _ = first_revision(tmp_path, "linear")
    item, t = relative(tmp_path, digest)
    cfg = config([item]) | {"integration": "incremental"}
    cfg["current"] = {"revision": 1, "digest": digest, "files": files(rev1)}
    code, term, rev2 = run_merge(tmp_path, cfg, "rev2")
    assert code == 0, term
    for m in MODULES:
        assert close(
            delta(rev2 / "adapter.safetensors", m),
            delta(rev1 / "adapter.safetensors", m) + dense(t, m, 2.0),
        )
    manifest = json.loads((rev2 / "manifest.json").read_text())
    assert manifest["meta"]["maxRank"] == 8 + 8  # the parent's rank (4 + 4) plus the branch's
    (entry_,) = manifest["meta"]["inputs"]
    assert entry_["parent"] == {"revision": 1, "digest": digest, "stale": 0}
    assert entry_["coefficient"] == 1.0


def test_a_dense_strategy_adds_the_update_to_its_full_rebuild(tmp_path: Path) -> None:
    """TIES rebuilds every revision from all inputs: those from the base model by TIES, the
    branch added on top exactly."""
    digest, rev1, inputs = first_revision(tmp_path, "ties")
    item, t = relative(tmp_path, digest, stale=0, rank=2)
    again = [i | {"new": False} for i in inputs]
    code, term, rev2 = run_merge(tmp_path, config([*again, item], type="ties", density=0.5), "rev2")
    assert code == 0, term
    for m in MODULES:
        want = delta(rev1 / "adapter.safetensors", m) + dense(t, m, 8.0)
        assert close(delta(rev2 / "adapter.safetensors", m), want)


def test_branch_rank_recompresses_to_the_best_approximation(tmp_path: Path) -> None:
    digest, rev1, _ = first_revision(tmp_path, "linear")
    item, t = relative(tmp_path, digest, stale=2)
    cfg = config([item]) | {"integration": "incremental", "branches": {"rank": 6}}
    cfg["current"] = {"revision": 1, "digest": digest, "files": files(rev1)}
    code, term, rev2 = run_merge(tmp_path, cfg, "rev2")
    assert code == 0, term
    out = load(rev2 / "adapter.safetensors")
    for m in MODULES:
        exact = delta(rev1 / "adapter.safetensors", m) + dense(t, m, 2.0)
        u, s, vh = torch.linalg.svd(exact)
        best = (u[:, :6] * s[:6]) @ vh[:6]
        assert out[f"{m}.lora_A.weight"].shape[0] == 6
        assert close(delta(rev2 / "adapter.safetensors", m), best, 1e-5)
    meta = json.loads((rev2 / "manifest.json").read_text())["meta"]
    assert meta["branchRank"] == 6 and meta["inputs"][0]["parent"]["stale"] == 2


def test_stacking_writes_over_its_own_input_and_keeps_dense_layers(tmp_path: Path) -> None:
    d, t = make_adapter(tmp_path / "x", 3, 5)
    ad = load_adapter(tmp_path / "x", "h/x", d, BASE)
    onto = tmp_path / "c.safetensors"
    dense0 = {f"{m}.delta.weight": torch.randn(32, 24) for m in MODULES[:1]}
    from safetensors.torch import save_file

    save_file(dense0, str(onto))
    rank = stacking.stack_onto(onto, [ad], onto)
    got = load(onto)
    assert rank == 3  # the modules the composite lacked come as the branch's factors
    m0 = MODULES[0]
    assert close(
        got[f"{m0}.delta.weight"].double(),
        dense0[f"{m0}.delta.weight"].double() + dense(t, m0, 16 / 3),
    )
    assert not list(tmp_path.glob("*.stacking"))  # no temporary file left behind
    # A dense layer re-compressed: the truncated SVD of its sum, as factors.
    save_file(dense0, str(onto))
    stacking.stack_onto(onto, [ad], tmp_path / "r.safetensors", rank=4)
    got = load(tmp_path / "r.safetensors")
    exact = dense0[f"{m0}.delta.weight"].double() + dense(t, m0, 16 / 3)
    u, sv, vh = torch.linalg.svd(exact)
    assert got[f"{m0}.lora_A.weight"].shape == (4, 24)
    assert close(delta(tmp_path / "r.safetensors", m0), (u[:, :4] * sv[:4]) @ vh[:4], 1e-5)


def test_a_mixture_refuses_branches_and_the_config_names_a_bad_parent(tmp_path: Path) -> None:
    cfg = parse(config([]) | {"strategy": {"type": "mixture"}})
    use = [
        (object(), 1.0, {"namespace": "h", "name": "b", "digest": "x", "parent": {"revision": 1}})
    ]
    report: list[dict[str, Any]] = []
    assert _parents_fit(cfg, use, report) == []  # type: ignore[arg-type]
    assert report[0]["code"] == "ParentIsMixture"
    bad = config([]) | {
        "inputs": [
            {
                "namespace": "h",
                "name": "b",
                "digest": BASE,
                "files": [],
                "parent": {"revision": 0, "digest": BASE},
            }
        ]
    }
    with pytest.raises(ConfigError, match=r"inputs\[0\]\.parent\.revision"):
        parse(bad)
    with pytest.raises(ConfigError, match=r"branches\.rank"):
        parse(config([]) | {"branches": {"rank": 0}})
