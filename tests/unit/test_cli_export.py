"""`medforge composite pull --format peft`: the folder peft loads gives the logits the merger's
evaluation gives (to 1e-4), for factor composites of mixed ranks and for dense ones at full
rank; a lower rank reports its error; pickle never gets into a pushed model."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from medforge_cli import export, models
from medforge_cli.errors import CliError
from medforge_common.manifest import Manifest
from medforge_ml import classifier, synthetic

MODULES = {
    "vision_model.encoder.layers.0.self_attn.q_proj": 3,
    "vision_model.encoder.layers.1.mlp.fc1": 5,
}


def composite(work: Path, base: Path, dense: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """A composite file as the merger writes it, and its dense updates."""
    model, _, _ = classifier.load_base(base)
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    deltas = {}
    for m, r in MODULES.items():
        weight = cast(torch.Tensor, model.get_submodule(m).weight)
        d, k = weight.shape
        a = rng.normal(size=(r, k)).astype(np.float32) * 0.1
        b = rng.normal(size=(d, r)).astype(np.float32) * 0.1
        deltas[m] = torch.from_numpy(b @ a)
        if dense:
            tensors[m + ".delta.weight"] = b @ a
        else:
            tensors[m + ".lora_A.weight"], tensors[m + ".lora_B.weight"] = a, b
    work.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(work / "adapter.safetensors"))
    return deltas


def peft_logits(base: Path, folder: Path, pixels: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(str(base), use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(str(base))
    merged = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    clf = classifier.Classifier(merged, "clip-prompt", ("benign", "malignant"), tok).eval()
    with torch.no_grad():
        out: torch.Tensor = clf(pixels)
    return out


def merger_logits(
    base: Path, deltas: dict[str, torch.Tensor], pixels: torch.Tensor
) -> torch.Tensor:
    from medforge_merger.evaluate import Evaluator
    from medforge_merger.tasks import Task

    ev = Evaluator(base)
    task = Task(
        "t", ["benign", "malignant"], "clip-prompt", pixels, torch.zeros(len(pixels)).long()
    )
    return ev.logits(task, deltas)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic.tiny_clip(tmp_path_factory.mktemp("base") / "clip")


@pytest.mark.parametrize("dense", [False, True])
def test_peft_folder_matches_the_merger_evaluation(base: Path, tmp_path: Path, dense: bool) -> None:
    deltas = composite(tmp_path / "work", base, dense)
    manifest = Manifest("composite", "", [], {"strategy": "ties" if dense else "cat"})
    out = tmp_path / "peft"
    out.mkdir()
    report = export.to_peft(tmp_path / "work", manifest, out, rank=8 if dense else None)
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(MODULES)
    pixels = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    want = merger_logits(base, deltas, pixels)
    got = peft_logits(base, out, pixels)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    # The update changes the logits: the comparison is not between two unadapted models.
    assert not torch.allclose(merger_logits(base, {}, pixels), want, atol=1e-3)
    if dense:
        assert report["relativeError"] < 1e-5  # rank 8 holds the rank-3 and rank-5 updates


def test_dense_needs_a_rank_and_a_lower_one_reports_its_error(base: Path, tmp_path: Path) -> None:
    composite(tmp_path / "work", base, dense=True)
    manifest = Manifest("composite", "", [], {"strategy": "dare-ties"})
    with pytest.raises(CliError, match="--rank"):
        export.to_peft(tmp_path / "work", manifest, tmp_path, rank=None)
    out = tmp_path / "low"
    out.mkdir()
    report = export.to_peft(tmp_path / "work", manifest, out, rank=2)
    assert 0.05 < report["relativeError"] < 1 and report["maxRank"] == 2
    with pytest.raises(CliError, match="mixture"):
        export.to_peft(
            tmp_path / "work", Manifest("composite", "", [], {"strategy": "mixture"}), out, None
        )


def test_push_refuses_pickle_by_name_and_by_content_and_takes_nested_folders(
    base: Path, tmp_path: Path
) -> None:
    files = [p.relative_to(base).as_posix() for p in models.model_files(base)]
    assert "config.json" in files and any(f.endswith(".safetensors") for f in files)
    nested = tmp_path / "nested"
    (nested / "text_encoder").mkdir(parents=True)
    for p in base.iterdir():
        (nested / "text_encoder" / p.name).write_bytes(p.read_bytes())
    (nested / "config.json").write_text("{}")
    (nested / "model.safetensors").write_bytes((base / "model.safetensors").read_bytes())
    got = [p.relative_to(nested).as_posix() for p in models.model_files(nested)]
    assert "text_encoder/config.json" in got
    (nested / "pytorch_model.bin").write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(CliError, match="pickle"):
        models.model_files(nested)
    (nested / "pytorch_model.bin").unlink()
    # A pickle under an innocent name is caught by its content.
    (nested / "text_encoder" / "extra.safetensors").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(CliError, match="pickle"):
        models.model_files(nested)


def test_push_refuses_a_name_that_is_no_basemodel_name(
    base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from medforge_cli.main import main

    assert main(["model", "push", str(base), "--name", "../Other_Model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--name" in err[0]
