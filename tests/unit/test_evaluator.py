"""`medforge-evaluate` on real merged composites: its figures for the candidate and the served
revision equal those of a model loaded independently (the composite exported as a peft folder,
loaded with PeftModel.from_pretrained, images decoded with PIL, metrics from scikit-learn) to
1e-5; a set below minSamples reports TooSmall and nothing else; files shared with the
hospital's own training set are counted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from medforge_cli import export
from medforge_cli.errors import CliError
from medforge_common.manifest import Manifest
from medforge_ml import classifier
from medforge_ml.synthetic import make_dataset
from medforge_trainer.evaluate import main as evaluate_main
from tests.merge_experiment import INSTITUTIONS, Setup, merge

pytestmark = pytest.mark.unit
TASK, CLASSES, STYLE = INSTITUTIONS[0]


def artifact(directory: Path, names: list[str]) -> dict[str, Any]:
    raw = (directory / "manifest.json").read_bytes()
    digest = Manifest.from_json(raw.decode()).digest()
    files = [{"name": n, "path": str(directory / n)} for n in ["manifest.json", *names]]
    return {"digest": digest, "files": files}


def run(tmp: Path, setup: Setup, data: Path, cand: Path, served: Path, **extra: Any) -> Any:
    base_manifest = Manifest.from_json((setup.base / "manifest.json").read_text(), "base")
    cfg = {
        "kind": "evaluate",
        "task": {"name": TASK, "classes": CLASSES},
        "minSamples": 20,
        "dataset": {"path": str(data)},
        "baseModel": {
            "digest": setup.digest,
            "files": [{"name": "manifest.json", "path": str(setup.base / "manifest.json")}]
            + [{"name": f.name, "path": str(setup.base / f.name)} for f in base_manifest.files],
        },
        "candidate": artifact(cand, ["adapter.safetensors"]) | {"revision": 2},
        "served": artifact(served, ["adapter.safetensors"]) | {"revision": 1},
        **extra,
    }
    (tmp / "eval.json").write_text(json.dumps(cfg))
    rc = evaluate_main(["--config", str(tmp / "eval.json"), "--termination-log", str(tmp / "t")])
    assert rc == 0, (tmp / "t").read_text()
    return json.loads((tmp / "t").read_text())


def independent(setup: Setup, composite: Path, data: Path, tmp: Path) -> dict[str, Any]:
    """The figures of a model that shares no code with the evaluator's scoring path."""
    from peft import PeftModel
    from sklearn.metrics import (  # type: ignore[import-untyped]
        accuracy_score,
        f1_score,
        recall_score,
        roc_auc_score,
    )
    from transformers import AutoTokenizer, CLIPModel

    out = tmp / f"peft-{composite.name}"
    out.mkdir()
    manifest = Manifest.from_json((composite / "manifest.json").read_text())
    try:
        export.to_peft(composite, manifest, out, rank=None)
    except CliError:  # a dense composite: at full rank
        export.to_peft(composite, manifest, out, rank=64)
    model = CLIPModel.from_pretrained(str(setup.base), use_safetensors=True)
    merged = PeftModel.from_pretrained(model, str(out)).merge_and_unload()
    tok = AutoTokenizer.from_pretrained(str(setup.base))
    clf = classifier.Classifier(merged, "clip-prompt", tuple(CLASSES), tok).eval()
    size = int(json.loads((setup.base / "config.json").read_text())["vision_config"]["image_size"])
    pics, labels = [], []
    for label, c in enumerate(CLASSES):
        for p in sorted((data / c).iterdir()):
            with Image.open(p) as im:
                rgb = im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
            pics.append(np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1))
            labels.append(label)
    x = torch.from_numpy(np.stack(pics))
    mean = torch.tensor(classifier.CLIP_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(classifier.CLIP_STD).view(1, 3, 1, 1) * 255
    with torch.no_grad():
        probs = torch.softmax(clf((x - mean) / std).float(), dim=-1).numpy()
    y, pred = np.array(labels), probs.argmax(axis=1)
    recall = recall_score(y, pred, average=None, labels=list(range(len(CLASSES))))
    return {
        "accuracy": accuracy_score(y, pred),
        "f1": f1_score(y, pred, average="macro"),
        "auc": roc_auc_score(y, probs[:, 1]),
        "samples": len(y),
        "recall": dict(zip(CLASSES, recall.tolist(), strict=True)),
    }


def test_site_figures_equal_an_independently_loaded_model(
    three_institutions: Setup, tmp_path: Path
) -> None:
    setup = three_institutions
    strategy = {"type": "linear", "weights": {}}
    cand = merge(setup, tmp_path, strategy, "candidate")
    only_first = Setup(setup.base, setup.digest, setup.adapters[:1], setup.heldout[:1])
    served = merge(only_first, tmp_path, strategy, "served")
    # Another scanner's noisier images: neither revision is perfect on them.
    data = make_dataset(tmp_path / "site", CLASSES, 15, seed=77, style=STYLE + 1, noise=250.0)
    got = run(tmp_path, setup, data, cand, served)
    assert got["state"] == "Reported" and got["overlap"] == 0
    for key, composite in (("candidate", cand), ("served", served)):
        want = independent(setup, composite, data, tmp_path)
        mine = got[key]
        assert mine["samples"] == want["samples"] == 30
        for m in ("accuracy", "f1", "auc"):
            assert abs(mine[m] - want[m]) <= 1e-5, (key, m, mine[m], want[m])
        for c in CLASSES:
            assert abs(mine["recall"][c] - want["recall"][c]) <= 1e-5
    assert got["candidate"]["revision"] == 2 and got["served"]["revision"] == 1
    # The two revisions differ on these images: the comparison is not of one model with itself.
    probe = [got["candidate"][m] != got["served"][m] for m in ("accuracy", "f1", "auc")]
    assert any(probe)


def test_a_small_set_reports_too_small_and_overlap_is_counted(
    three_institutions: Setup, tmp_path: Path
) -> None:
    setup = three_institutions
    cand = merge(setup, tmp_path, {"type": "linear", "weights": {}}, "c")
    small = make_dataset(tmp_path / "small", CLASSES, 5, seed=3, style=STYLE)
    assert run(tmp_path, setup, small, cand, cand) == {"state": "TooSmall"}
    # The site's set shares its files with the hospital's own training set.
    trained = setup.adapters[0]
    prints = json.loads((trained / "fingerprints.json").read_text())["files"]
    assert len(prints) == 2 * 40  # every file the trainer scanned
    data = trained.parent / "data"  # the very images the first hospital trained on
    got = run(
        tmp_path, setup, data, cand, cand,
        fingerprints=[artifact(trained, ["fingerprints.json"])],
    )  # fmt: skip
    assert got["overlap"] == 80
