"""Training from a composite revision (spec.startFrom) with the real trainer and merger on a tiny
CLIP: the revision's update is folded into the frozen weights, the new LoRA learns on top, and
the revision merged from it serves exactly what its hospital trained."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from medforge_common.manifest import Manifest
from medforge_ml import classifier, composite
from medforge_trainer import config, model
from medforge_trainer.errors import ConfigError
from tests.merge_helpers import files
from tests.train_helpers import job_config, make_dataset, prepare, tiny_clip
from tests.unit.test_merge_job import run_merge
from tests.unit.test_trainer import run_trainer

CLASSES = ["benign", "malignant", "normal"]


@pytest.fixture(scope="module")
def parent(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny CLIP, a hospital's images, and revision 1 of a composite merged from one
    contribution by the real merger."""
    root = tmp_path_factory.mktemp("branch")
    base = tiny_clip(root / "clip")
    digest = prepare(base)
    data = make_dataset(root / "data", CLASSES, 24, seed=3)
    (root / "first").mkdir()
    cfg = job_config(base, digest, data, CLASSES, training={"epochs": 2, "learningRate": 0.02})
    rc, term, out = run_trainer(root / "first", cfg)
    assert rc == 0, term
    first = json.loads(term)["artifact"]["digest"]
    merge = {
        "kind": "merge",
        "baseModel": {"digest": digest, "files": []},
        "integration": "incremental",
        "strategy": {"type": "linear"},
        "inputs": [{"namespace": "a", "name": "first", "digest": first, "files": files(out)}],
    }
    rc, term, rev1 = run_merge(root, merge, "rev1")
    assert rc == 0, term
    return {
        "root": root,
        "base": base,
        "digest": digest,
        "data": data,
        "rev1": rev1,
        "rev1_digest": json.loads(term)["artifact"]["digest"],
    }


def start_from(p: dict[str, Any]) -> dict[str, Any]:
    return {
        "composite": "forge/chest",
        "revision": 1,
        "digest": p["rev1_digest"],
        "path": str(p["rev1"]),
    }


def logits(
    base: Path, deltas: list[dict[str, torch.Tensor]], adapter: Path | None, cfg: Any
) -> torch.Tensor:
    """The classifier's logits on fixed images: base weights plus `deltas`, and the trained
    LoRA on top when `adapter` is given."""
    net, tok, raw = model.load_base(base)
    for d in deltas:
        composite.add_updates(net, d)
    size, _, _ = model.image_settings(base, raw)
    clf = classifier.Classifier(net, "clip-prompt", tuple(CLASSES), tok)
    if adapter is not None:
        clf = model.add_lora(clf, config.parse(cfg).lora)
        model.load_adapter_state(clf, load_file(str(adapter)), {})
    x = torch.randn(6, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out: torch.Tensor = clf.eval()(x).float()
    return out


def branch(parent: dict[str, Any], tmp: Path, **training: Any) -> tuple[Any, Path, str]:
    """A contribution trained from revision 1 by the real trainer: (config, output, digest)."""
    cfg = job_config(
        parent["base"],
        parent["digest"],
        parent["data"],
        CLASSES,
        training=training,
        startFrom=start_from(parent),
    )
    rc, term, out = run_trainer(tmp, cfg)
    assert rc == 0, term
    return cfg, out, json.loads(term)["artifact"]["digest"]


def test_learning_rate_zero_gives_the_parents_logits(
    parent: dict[str, Any], tmp_path: Path
) -> None:
    cfg, out, _ = branch(parent, tmp_path, epochs=1, learningRate=0.0)
    meta = Manifest.from_json((out / "manifest.json").read_text()).meta
    assert meta["parent"] == {
        "composite": "forge/chest",
        "revision": 1,
        "digest": parent["rev1_digest"],
    }
    (rev1,) = composite.read_updates(parent["rev1"])
    ours = logits(parent["base"], [rev1[1]], out / "adapter.safetensors", cfg)
    theirs = logits(parent["base"], [rev1[1]], None, cfg)
    bare = logits(parent["base"], [], None, cfg)
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)
    assert not torch.allclose(ours, bare, atol=1e-3)  # the parent's update was folded in


def test_the_merged_revision_serves_what_the_hospital_trained(
    parent: dict[str, Any], tmp_path: Path
) -> None:
    cfg, out, digest = branch(parent, tmp_path, epochs=2, learningRate=0.02, seed=1)
    merge = {
        "kind": "merge",
        "baseModel": {"digest": parent["digest"], "files": []},
        "integration": "incremental",
        "strategy": {"type": "linear"},
        "current": {"revision": 1, "digest": parent["rev1_digest"], "files": files(parent["rev1"])},
        "inputs": [
            {
                "namespace": "b",
                "name": "branch",
                "digest": digest,
                "files": files(out),
                "parent": {"revision": 1, "digest": parent["rev1_digest"], "stale": 0},
            }
        ],
    }
    rc, term, rev2 = run_merge(tmp_path, merge, "rev2")
    assert rc == 0, term
    (rev1,) = composite.read_updates(parent["rev1"])
    (served,) = composite.read_updates(rev2)
    trained = logits(parent["base"], [rev1[1]], out / "adapter.safetensors", cfg)
    assert torch.allclose(logits(parent["base"], [served[1]], None, cfg), trained, atol=1e-5)


def test_a_parent_that_does_not_fit_is_refused_with_its_reason(
    parent: dict[str, Any], tmp_path: Path
) -> None:
    wrong = start_from(parent) | {"digest": "sha256:" + "0" * 64}
    cases = [
        (wrong, "the revision was replaced"),
        (start_from(parent) | {"revision": 0}, "startFrom.revision"),
        (
            {"composite": "chest", "revision": 1, "digest": parent["rev1_digest"], "path": "x"},
            "startFrom.composite",
        ),
    ]
    for i, (start, why) in enumerate(cases):
        d = tmp_path / str(i)
        d.mkdir()
        cfg = job_config(
            parent["base"],
            parent["digest"],
            parent["data"],
            CLASSES,
            training={"epochs": 1},
            startFrom=start,
        )
        rc, term, _ = run_trainer(d, cfg)
        assert rc != 0 and why in term, term


def test_fedprox_keeps_the_update_closer_to_its_parent(
    parent: dict[str, Any], tmp_path: Path
) -> None:
    """The same run with mu > 0 changes the local update, and shrinks it (weight space)."""
    norms = []
    for mu in (0.0, 5.0):
        (tmp_path / str(mu)).mkdir()
        cfg, out, _ = branch(
            parent, tmp_path / str(mu), epochs=2, learningRate=0.02, seed=1, proximalMu=mu
        )
        (update,) = composite.read_updates(_as_revision(out, cfg))
        norms.append(sum(float((d**2).sum()) for d in update[1].values()) ** 0.5)
        meta = Manifest.from_json((out / "manifest.json").read_text()).meta
        assert meta["training"].get("proximalMu", 0.0) == mu
    assert norms[0] > 0 and norms[1] < 0.9 * norms[0], norms


def _as_revision(out: Path, cfg: Any) -> Path:
    """An adapter's dense update (alpha / rank folded in) in a folder read_updates takes."""
    lora = config.parse(cfg).lora
    scale = lora.alpha / lora.rank
    tensors = load_file(str(out / "adapter.safetensors"))
    folded = {
        k.removesuffix(".lora_A.weight") + ".delta.weight": scale
        * tensors[k.replace("lora_A", "lora_B")]
        @ v
        for k, v in tensors.items()
        if k.endswith(".lora_A.weight")
    }
    d = out.parent / "as-revision"
    d.mkdir()
    save_file(folded, str(d / "adapter.safetensors"))
    return d


def test_fedprox_and_dp_sgd_are_refused_together(parent: dict[str, Any]) -> None:
    cfg = job_config(
        parent["base"],
        parent["digest"],
        parent["data"],
        CLASSES,
        training={"proximalMu": 0.1},
        privacy={"epsilon": 1.0, "delta": 1e-5},
    )
    with pytest.raises(ConfigError, match=r"training\.proximalMu"):
        config.parse(cfg)
