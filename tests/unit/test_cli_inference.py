"""`medforge predict`, `evaluate` and `--format merged` give what the merger's evaluation gives:
the same probabilities for a merged composite and for a mixture (its coefficient-weighted class
probabilities), on the same images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import save_file

from medforge_cli.main import main
from medforge_ml import basemodel, classifier, synthetic
from medforge_ml.composite import Predictor, write_merged
from tests.unit.test_cli_export import MODULES

CLASSES = ["benign", "malignant"]


def factors(base: Path, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    model, _, _ = classifier.load_base(base)
    rng = np.random.default_rng(seed)
    out = {}
    for m, r in MODULES.items():
        d, k = model.get_submodule(m).weight.shape  # type: ignore[misc]
        out[m] = (
            rng.normal(size=(r, k)).astype(np.float32) * 0.2,
            rng.normal(size=(d, r)).astype(np.float32) * 0.2,
        )
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    b = synthetic.tiny_clip(tmp_path_factory.mktemp("base") / "clip")
    basemodel.prepare_model_dir(b, "test")
    return b


def tasks_bundle(folder: Path) -> list[object]:
    from medforge_merger.tasks import Task, save_bundle

    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    tasks = [
        Task("derm", CLASSES, "clip-prompt", images, torch.zeros(5).long()),
        Task(
            "xray",
            ["normal", "pneumonia", "covid"],
            "clip-prompt",
            images.clone(),
            torch.zeros(5).long(),
        ),
    ]
    save_bundle(tasks, folder / "tasks.safetensors")
    return list(tasks)


def test_merged_composite_probabilities_match_the_merger(base: Path, tmp_path: Path) -> None:
    from medforge_merger.evaluate import Evaluator

    f = factors(base, 0)
    tensors = {}
    for m, (a, b) in f.items():
        tensors[m + ".lora_A.weight"], tensors[m + ".lora_B.weight"] = a, b
    save_file(tensors, str(tmp_path / "adapter.safetensors"))
    tasks = tasks_bundle(tmp_path)
    pred = Predictor(base, tmp_path)
    ev = Evaluator(base)
    deltas = {m: torch.from_numpy(b @ a) for m, (a, b) in f.items()}
    for t in tasks:
        images = t.images  # type: ignore[attr-defined]
        # The predictor takes uint8 pixels; feed it the same normalised images.
        got = torch.softmax(pred.classifiers[t.name](images).float(), -1)  # type: ignore[attr-defined]
        want = torch.softmax(ev.logits(t, deltas), -1)  # type: ignore[arg-type]
        assert torch.allclose(got, want, atol=1e-5)
    # merged: the base model with the update folded in gives the same outputs.
    out = tmp_path / "merged"
    write_merged(base, tmp_path, out)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    merged_model, tok, _ = classifier.load_base(out)
    clf = classifier.Classifier(merged_model, "clip-prompt", tuple(CLASSES), tok).eval()
    t0 = tasks[0]
    with torch.no_grad():
        assert torch.allclose(
            torch.softmax(clf(t0.images), -1),  # type: ignore[attr-defined]
            torch.softmax(ev.logits(t0, deltas), -1),  # type: ignore[arg-type]
            atol=1e-5,
        )


def test_mixture_probabilities_match_the_merger(base: Path, tmp_path: Path) -> None:
    from medforge_merger.evaluate import Evaluator
    from medforge_merger.mixture import Mixture
    from medforge_merger.strategies import Factors

    adapters = []
    for seed in (1, 2):
        f = factors(base, seed)
        adapters.append(
            {m: Factors(torch.from_numpy(b), torch.from_numpy(a)) for m, (a, b) in f.items()}
        )
    mix = Mixture(adapters, [0.7, 0.4], ["h1/a", "h2/b"])
    mix.save(tmp_path / "mixture.safetensors")
    tasks = tasks_bundle(tmp_path)
    pred = Predictor(base, tmp_path)
    ev = Evaluator(base)
    for t in tasks:
        want = mix.probabilities(ev, t)  # type: ignore[arg-type]
        got = pred._batch(t.images)[t.name]  # type: ignore[attr-defined]
        assert torch.allclose(got, want, atol=1e-5)
    with pytest.raises(Exception, match="mixture"):
        write_merged(base, tmp_path, tmp_path / "m")


def test_predict_and_evaluate_commands(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = factors(base, 0)
    comp = tmp_path / "pulled"
    comp.mkdir()
    save_file(
        {
            k: v
            for m, (a, b) in f.items()
            for k, v in ((m + ".lora_A.weight", a), (m + ".lora_B.weight", b))
        },
        str(comp / "adapter.safetensors"),
    )
    tasks_bundle(comp)
    (comp / "medforge-export.json").write_text(json.dumps({"format": "raw"}))
    folder = tmp_path / "held-out"
    rng = np.random.default_rng(0)
    paths = []
    for c in CLASSES:
        (folder / c).mkdir(parents=True)
        for i in range(3):
            p = folder / c / f"{i}.png"
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(p)
            paths.append(str(p))
    code = main(
        ["predict", "--composite", str(comp), "--base-model", str(base), *paths[:2], "--json"]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    probs = out[0]["tasks"]["derm"]["probabilities"]
    assert set(probs) == set(CLASSES) and abs(sum(probs.values()) - 1) < 1e-4
    assert set(out[0]["tasks"]) == {"derm", "xray"}
    assert (
        main(
            ["evaluate", "--composite", str(comp), "--base-model", str(base), str(folder), "--json"]
        )
        == 0
    )
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {"derm"} and metrics["derm"]["samples"] == 6  # xray's classes differ
    assert 0 <= metrics["derm"]["accuracy"] <= 1
    # A wrong base model is refused, by its digest.
    (comp / "medforge-export.json").write_text(
        json.dumps({"format": "raw", "baseModel": {"name": "x", "digest": "sha256:" + "0" * 64}})
    )
    assert main(["predict", "--composite", str(comp), "--base-model", str(base), paths[0]]) == 2
    assert "not the base model" in capsys.readouterr().err
