"""medforge-train end to end on tiny models built from configs and generated images: it learns,
saves LoRA tensors only, reloads to the same predictions, distils a usable summary set, and
fails with a one-line reason on each kind of bad input."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from medforge_common.manifest import Manifest
from medforge_merger.adapters import load_adapter
from medforge_trainer import config, dataset, model, train
from medforge_trainer.__main__ import main
from tests.train_helpers import job_config, make_dataset, prepare, tiny_clip, tiny_vit

CLASSES = ["benign", "malignant", "normal"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("trainer")
    clip = tiny_clip(root / "clip")
    vit = tiny_vit(root / "vit")
    return {
        "root": root,
        "clip": clip,
        "clip_digest": prepare(clip),
        "vit": vit,
        "vit_digest": prepare(vit),
        "data": make_dataset(root / "data", CLASSES, 40, seed=1),
        "heldout": make_dataset(root / "heldout", CLASSES, 30, seed=2),
    }


def run_trainer(tmp: Path, cfg: dict[str, Any]) -> tuple[int, str, Path]:
    (tmp / "job.json").write_text(json.dumps(cfg))
    out = tmp / "out"
    rc = main(
        [
            "--config",
            str(tmp / "job.json"),
            "--output-dir",
            str(out),
            "--termination-log",
            str(tmp / "termination-log"),
        ]
    )
    return rc, (tmp / "termination-log").read_text(), out


def reload(
    base: Path, cfg: dict[str, Any], out: Path
) -> tuple[model.Classifier, train.Normalize, int]:
    parsed = config.parse(cfg)
    net, tok, raw = model.load_base(base)
    size, mean, std = model.image_settings(base, raw)
    clf = model.add_lora(model.Classifier(net, parsed.head, parsed.classes, tok), parsed.lora)
    head = load_file(str(out / "head.safetensors")) if (out / "head.safetensors").exists() else {}
    model.load_adapter_state(clf, load_file(str(out / "adapter.safetensors")), head)
    clf.eval()
    return clf, train.normalizer(mean, std, torch.device("cpu")), size


def heldout_accuracy(clf: model.Classifier, norm: train.Normalize, root: Path, size: int) -> float:
    data = dataset.load(root, tuple(CLASSES), size, 0.5, 0, 0.0)
    images = torch.cat([data.train.images, data.validation.images])
    labels = torch.cat([data.train.labels, data.validation.labels])
    rt = train.Runtime(torch.device("cpu"), None)
    probs = train.predict(clf, images, rt, norm)
    return float((probs.argmax(1) == labels).double().mean())


@pytest.mark.parametrize("head", ["clip-prompt", "linear"])
def test_lora_training_beats_chance_and_reloads(
    assets: dict[str, Any], tmp_path: Path, head: str
) -> None:
    base = assets["clip"] if head == "clip-prompt" else assets["vit"]
    digest = assets["clip_digest"] if head == "clip-prompt" else assets["vit_digest"]
    targets = ["q_proj", "v_proj"] if head == "clip-prompt" else ["q_proj", "v_proj", "fc1"]
    cfg = job_config(base, digest, assets["data"], CLASSES, head, lora={"targetModules": targets})
    rc, term, out = run_trainer(tmp_path, cfg)
    assert rc == 0, term
    result = json.loads(term)
    manifest = Manifest.from_json((out / "manifest.json").read_text())
    assert result["artifact"]["digest"] == manifest.digest()
    assert manifest.base_model_digest == digest
    assert manifest.meta["classes"] == CLASSES and manifest.meta["head"] == head
    assert manifest.meta["rank"] == 4 and manifest.meta["targetModules"] == targets
    assert manifest.meta["datasetFingerprint"].startswith("sha256:")
    assert manifest.meta["metrics"] == result["metrics"]
    assert result["metrics"]["accuracy"] > 0.7  # chance is 1/3

    # LoRA tensors only, keyed by the base model's module names, in the image path only.
    with safe_open(str(out / "adapter.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert not any("text_model" in k or k.startswith("head") for k in keys)
    expected_layer = (
        "vision_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"
        if head == "clip-prompt"
        else "layers.0.mlp.fc1.lora_A.weight"
    )
    assert expected_layer in keys
    assert (out / "head.safetensors").exists() == (head == "linear")

    # Held-out data (a different generator seed) through the reloaded adapter.
    clf, norm, size = reload(base, cfg, out)
    assert heldout_accuracy(clf, norm, assets["heldout"], size) > 0.7

    # Reloading reproduces the trainer's own validation numbers exactly.
    parsed = config.parse(cfg)
    data = dataset.load(assets["data"], parsed.classes, size, 0.25, 0, 0.05)
    rt = train.Runtime(torch.device("cpu"), None)
    assert train.evaluate(clf, data.validation, rt, norm) == result["metrics"]

    # The merger accepts the artifact as it is.
    ad = load_adapter(out, "ns/x", manifest.digest(), digest)
    assert ad.scale == pytest.approx(8 / 4) and len(ad.shapes) == len(keys) // 2


def test_reloaded_adapter_gives_identical_probabilities(
    assets: dict[str, Any], tmp_path: Path
) -> None:
    cfg = job_config(assets["clip"], assets["clip_digest"], assets["data"], CLASSES)
    parsed = config.parse(cfg)
    torch.manual_seed(0)
    net, tok, raw = model.load_base(assets["clip"])
    size, mean, std = model.image_settings(assets["clip"], raw)
    clf = model.add_lora(model.Classifier(net, parsed.head, parsed.classes, tok), parsed.lora)
    rt = train.Runtime(torch.device("cpu"), None)
    norm = train.normalizer(mean, std, rt.device)
    data = dataset.load(assets["data"], parsed.classes, size, 0.25, 0, 0.05)
    train.train(clf, data.train, parsed.training, rt, norm, log=lambda _: None)
    before = train.predict(clf, data.validation.images, rt, norm)
    (tmp_path / "out").mkdir()
    save_file(model.adapter_state(clf), str(tmp_path / "out" / "adapter.safetensors"))
    fresh, norm2, _ = reload(assets["clip"], cfg, tmp_path / "out")
    after = train.predict(fresh, data.validation.images, rt, norm2)
    assert torch.allclose(before, after, atol=1e-6)
    # ... and the adapter matters: the bare base model predicts differently.
    bare = model.Classifier(model.load_base(assets["clip"])[0], parsed.head, parsed.classes, tok)
    assert not torch.allclose(
        before, train.predict(bare, data.validation.images, rt, norm), atol=1e-3
    )


def test_distilled_set_has_labels_and_teaches_a_classifier(
    assets: dict[str, Any], tmp_path: Path
) -> None:
    cfg = job_config(
        assets["clip"],
        assets["clip_digest"],
        assets["data"],
        CLASSES,
        distillation={"imagesPerClass": 5, "iterations": 80},
    )
    rc, term, out = run_trainer(tmp_path, cfg)
    assert rc == 0, term
    distilled = load_file(str(out / "distilled.safetensors"))
    assert distilled["images"].shape == (15, 3, 32, 32)
    assert distilled["labels"].tolist() == [0] * 5 + [1] * 5 + [2] * 5
    with safe_open(str(out / "distilled.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["classes"]) == CLASSES
    manifest = Manifest.from_json((out / "manifest.json").read_text())
    assert "distilled.safetensors" in {f.name for f in manifest.files}

    # A nearest-class-mean classifier fitted on the distilled images alone, on the trained
    # model's features, classifies real held-out images far above chance.
    clf, norm, size = reload(assets["clip"], cfg, out)
    with torch.no_grad():
        syn_feats = clf.features(distilled["images"])
        means = torch.stack([syn_feats[distilled["labels"] == c].mean(0) for c in range(3)])
        held = dataset.load(assets["heldout"], tuple(CLASSES), size, 0.5, 0, 0.0)
        feats = clf.features(norm(held.train.images))
    preds = torch.cdist(feats, means).argmin(1)
    assert float((preds == held.train.labels).double().mean()) > 0.6


def copy_data(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_bad_inputs_fail_with_one_line_reasons(assets: dict[str, Any], tmp_path: Path) -> None:
    base, digest = assets["clip"], assets["clip_digest"]
    cases: list[tuple[str, dict[str, Any], str, int]] = []
    cases.append(("missing", {"dataset": {"uri": str(tmp_path / "nope")}}, "dataset unreadable", 1))
    empty_root = tmp_path / "flat"
    empty_root.mkdir()
    (empty_root / "a.png").write_bytes(b"x")
    cases.append(("flat", {"dataset": {"uri": str(empty_root)}}, "holds no class folders", 1))
    mism = copy_data(assets["data"], tmp_path / "mismatch")
    shutil.move(mism / "normal", mism / "healthy")
    cases.append(
        (
            "mismatch",
            {"dataset": {"uri": str(mism)}},
            "class mismatch: no folder for class(es) normal; folder(s) healthy are not in task.classes",
            1,
        )
    )
    empty = copy_data(assets["data"], tmp_path / "empty")
    shutil.rmtree(empty / "normal")
    (empty / "normal").mkdir()
    cases.append(("emptyclass", {"dataset": {"uri": str(empty)}}, "empty class: normal/", 1))
    bad_digest = "sha256:" + "0" * 64
    cases.append(
        (
            "digest",
            {"baseModel": {"digest": bad_digest, "path": str(base)}},
            "base model digest mismatch",
            1,
        )
    )
    corrupt = copy_data(assets["data"], tmp_path / "corrupt")
    for i in range(20):
        (corrupt / "benign" / f"img{i:04d}.png").write_bytes(b"not a png at all")
    cases.append(
        (
            "corrupt",
            {"dataset": {"uri": str(corrupt)}},
            "corrupt images: 20 of 120 files cannot be decoded",
            1,
        )
    )
    cases.append(
        (
            "targets",
            {"lora": {"targetModules": ["query"]}},
            "lora.targetModules: 'query' matches no linear layer",
            1,
        )
    )
    cases.append(
        (
            "batch",
            {"training": {"batchSize": 0}},
            "invalid job config: training.batchSize: 0 is outside [1, 4096]",
            2,
        )
    )
    cases.append(
        (
            "head",
            {"task": {"name": "t", "classes": CLASSES, "head": "linear-probe"}},
            "task.head: 'linear-probe' is not one of",
            2,
        )
    )
    for name, override, reason, code in cases:
        d = tmp_path / f"case-{name}"
        d.mkdir()
        rc, term, out = run_trainer(
            d, job_config(base, digest, assets["data"], CLASSES, **override)
        )
        assert rc == code, (name, term)
        assert reason in term, (name, term)
        assert "\n" not in term and not out.exists(), name  # one line, nothing half-written


def test_a_few_corrupt_images_are_skipped_and_counted(
    assets: dict[str, Any], tmp_path: Path
) -> None:
    data = copy_data(assets["data"], tmp_path / "data")
    (data / "malignant" / "img0003.png").write_bytes(b"\x89PNG truncated")
    (data / "normal" / "notes.txt").write_text("not an image: ignored")
    cfg = job_config(assets["clip"], assets["clip_digest"], data, CLASSES, training={"epochs": 1})
    rc, term, out = run_trainer(tmp_path, cfg)
    assert rc == 0, term
    manifest = Manifest.from_json((out / "manifest.json").read_text())
    assert manifest.meta["corruptSkipped"] == 1
    assert manifest.meta["samples"]["train"] + manifest.meta["samples"]["validation"] == 119


def test_pickle_base_model_is_refused(assets: dict[str, Any], tmp_path: Path) -> None:
    base = tmp_path / "pickled"
    shutil.copytree(assets["clip"], base)
    (base / "pytorch_model.bin").write_bytes(b"\x80\x04 pickle")
    (base / "manifest.json").unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "medforge_trainer", "--prepare-base-model", str(base)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert "pytorch_model.bin: pickle-based files are refused" in proc.stderr


def test_out_of_memory_advises_a_smaller_batch(assets: dict[str, Any], tmp_path: Path) -> None:
    """A real allocation failure: the trainer runs under an address-space limit that one huge
    batch exceeds."""
    # 512-pixel inputs with 8-pixel patches: 4,097 tokens per image, so one batch of all images
    # needs gigabytes of attention scores.
    base = tiny_clip(tmp_path / "clip512", image_size=512)
    cfg = job_config(base, prepare(base), assets["data"], CLASSES, training={"batchSize": 4096})
    (tmp_path / "job.json").write_text(json.dumps(cfg))
    script = (
        "import resource, sys, torch, transformers, peft\n"
        "from medforge_trainer.__main__ import main\n"
        "import medforge_trainer.model, medforge_trainer.train\n"
        "soft = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
        "resource.setrlimit(resource.RLIMIT_AS, (soft + 1536 * 2**20, resource.RLIM_INFINITY))\n"
        f"sys.exit(main(['--config', {str(tmp_path / 'job.json')!r}, '--termination-log', "
        f"{str(tmp_path / 'term')!r}]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    term = (tmp_path / "term").read_text()
    assert "out of memory at batch size 4096" in term and "lower spec.training.batchSize" in term
    assert resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY  # ours untouched


def test_bombs_and_links_out_of_the_dataset_are_skipped(
    assets: dict[str, Any], tmp_path: Path
) -> None:
    """A decompression bomb (a small PNG that claims 100 megapixels) and a link to a file
    outside the dataset's folder are skipped and counted; training goes on."""
    from PIL import Image

    data = copy_data(assets["data"], tmp_path / "data")
    bomb = data / "benign" / "bomb.png"
    Image.new("1", (10_000, 10_000)).save(bomb, optimize=True)  # ~12 KB on disk
    assert bomb.stat().st_size < 100_000
    secret = tmp_path / "outside.png"
    shutil.copyfile(next((data / "benign").glob("img*.png")), secret)
    (data / "malignant" / "linked.png").symlink_to(secret)
    cfg = job_config(assets["clip"], assets["clip_digest"], data, CLASSES, training={"epochs": 1})
    rc, term, out = run_trainer(tmp_path, cfg)
    assert rc == 0, term
    manifest = Manifest.from_json((out / "manifest.json").read_text())
    assert manifest.meta["corruptSkipped"] == 1  # the bomb, never decoded
    assert manifest.meta["linksOutsideSkipped"] == 1
    assert manifest.meta["samples"]["train"] + manifest.meta["samples"]["validation"] == 120
