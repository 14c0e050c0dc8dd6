"""The trainer's runtime and data path, on the CPU: the compile setting and its fallback, the
batch size when unset, decoding on several threads, a dataset larger than its memory budget
read from disk in chunks, and the figures a job reports (time to first step, images/s of
training after the first epoch and of distillation)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from medforge_common.manifest import Manifest
from medforge_trainer import config, dataset, distill, model, train
from medforge_trainer.errors import ConfigError
from tests.train_helpers import job_config, make_dataset, prepare, tiny_clip
from tests.unit.test_trainer import run_trainer

CLASSES = ["benign", "malignant"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("runtime")
    clip = tiny_clip(root / "clip")
    return {
        "root": root,
        "clip": clip,
        "digest": prepare(clip),
        "data": make_dataset(root / "data", CLASSES, 30, seed=3),
    }


def test_compile_and_batch_size_settings_are_checked() -> None:
    cfg = job_config(Path("/m"), "sha256:" + "a" * 64, Path("/d"), CLASSES)
    cfg["training"] = {}
    parsed = config.parse(cfg)
    assert parsed.training.batch_size is None and parsed.training.compile == "auto"
    cfg["training"] = {"compile": "never", "batchSize": 8}
    parsed = config.parse(cfg)
    assert parsed.training.batch_size == 8 and parsed.training.compile == "never"
    cfg["training"] = {"compile": "yes"}
    with pytest.raises(
        ConfigError, match=r"training\.compile: 'yes' is not one of auto, always, never"
    ):
        config.parse(cfg)
    # On a CPU, torch.compile only when asked.
    assert not train.pick_runtime("auto", "auto").compile
    assert train.pick_runtime("auto", "always").compile


def test_unset_batch_size_is_32_on_a_cpu(assets: dict[str, Any]) -> None:
    settings = config.TrainingSettings(epochs=1)
    rt = train.Runtime(torch.device("cpu"), None)
    data = dataset.load(assets["data"], tuple(CLASSES), 32, 0.25, 0, 0.0)
    assert train.pick_batch_size(torch.nn.Identity(), data.train, settings, rt, lambda x: x) == 32


def test_a_compilation_that_fails_leaves_the_eager_model_training(
    assets: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.compile compiles at the first call; when that fails (no compiler on the node, an
    unsupported operation), the step is taken again without it and training goes on."""

    class Broken(torch.nn.Module):
        def forward(self, *_: Any) -> Any:
            raise RuntimeError("inductor: no C++ compiler found")

    monkeypatch.setattr(torch, "compile", lambda m, **_: Broken())
    net, tok, raw = model.load_base(assets["clip"])
    size, mean, std = model.image_settings(assets["clip"], raw)
    lora = config.LoraSettings(rank=4, alpha=8, dropout=0.0)
    clf = model.add_lora(model.Classifier(net, "clip-prompt", tuple(CLASSES), tok), lora)
    rt = train.Runtime(torch.device("cpu"), None, compile=True)
    data = dataset.load(assets["data"], tuple(CLASSES), size, 0.25, 0, 0.0)
    lines: list[str] = []
    stats = train.train(
        clf,
        data.train,
        config.TrainingSettings(epochs=2, batch_size=8, learning_rate=0.005),
        rt,
        train.normalizer(mean, std, rt.device),
        log=lines.append,
        started=0.0,
    )
    assert any("torch.compile failed (RuntimeError)" in line for line in lines), lines
    assert np.isfinite(stats["loss"]) and stats["batchSize"] == 8
    assert stats["imagesPerSecondAfterFirstEpoch"] > 0 and stats["secondsToFirstStep"] > 0


def test_threads_decode_the_same_images(assets: dict[str, Any]) -> None:
    one = dataset.load(assets["data"], tuple(CLASSES), 32, 0.25, 0, 0.0, workers=1)
    four = dataset.load(assets["data"], tuple(CLASSES), 32, 0.25, 0, 0.0, workers=4)
    assert four.workers == 4 and four.decode_images_per_second > 0
    for a, b in ((one.train, four.train), (one.validation, four.validation)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_a_dataset_over_its_memory_budget_is_read_from_disk(
    assets: dict[str, Any], tmp_path: Path
) -> None:
    """Beyond the budget the decoded images go to files (not RAM), with the same split and
    pixels as in memory, and training reads them chunk by chunk."""
    in_memory = dataset.load(assets["data"], tuple(CLASSES), 32, 0.25, 0, 0.0)
    spilled = dataset.load(
        assets["data"], tuple(CLASSES), 32, 0.25, 0, 0.0, spill_dir=tmp_path / "d", budget=1
    )
    assert spilled.train.on_disk and not in_memory.train.on_disk
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["train.u8", "validation.u8"]
    for a, b in ((in_memory.train, spilled.train), (in_memory.validation, spilled.validation)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    net, tok, raw = model.load_base(assets["clip"])
    _, mean, std = model.image_settings(assets["clip"], raw)
    clf = model.add_lora(
        model.Classifier(net, "clip-prompt", tuple(CLASSES), tok), config.LoraSettings(rank=4)
    )
    rt = train.Runtime(torch.device("cpu"), None)
    stats = train.train(
        clf,
        spilled.train,
        config.TrainingSettings(epochs=1, batch_size=8),
        rt,
        train.normalizer(mean, std, rt.device),
        log=lambda _: None,
    )
    assert np.isfinite(stats["loss"])


@pytest.mark.parametrize("n, chunk", [(10, None), (10, 4), (4096 * 2 + 5, 4096)])
def test_batches_cover_every_image_once_and_chunks_stay_together(n: int, chunk: int | None) -> None:
    gen = torch.Generator().manual_seed(0)
    order = torch.cat(list(train.batches(n, 3, gen, chunk)))
    assert sorted(order.tolist()) == list(range(n))
    if chunk is not None:
        # Each chunk's images come one after another: a chunk is read once per epoch.
        for c in range((n + chunk - 1) // chunk):
            where = torch.nonzero(order // chunk == c).flatten()
            assert int(where.max() - where.min()) + 1 == len(where)


def test_the_job_reports_its_runtime_figures(assets: dict[str, Any], tmp_path: Path) -> None:
    cfg = job_config(
        assets["clip"],
        assets["digest"],
        assets["data"],
        CLASSES,
        training={"epochs": 2, "batchSize": 8, "learningRate": 0.005, "seed": 0},
        distillation={"imagesPerClass": 2, "iterations": 5},
    )
    cfg["training"].pop("batchSize")
    rc, term, out = run_trainer(tmp_path, cfg)
    assert rc == 0, term
    meta = Manifest.from_json((out / "manifest.json").read_text()).meta
    t = meta["training"]
    assert t["batchSize"] == 32 and t["device"] == "cpu"  # unset on a CPU: 32
    assert t["secondsToFirstStep"] > 0 and t["imagesPerSecondAfterFirstEpoch"] > 0
    assert t["decodeImagesPerSecond"] > 0
    assert meta["distillation"]["imagesPerSecond"] > 0 and meta["distillation"]["seconds"] > 0
    assert json.loads(term)["training"] == t


def test_distillation_runs_on_the_training_runtime(assets: dict[str, Any]) -> None:
    net, tok, raw = model.load_base(assets["clip"])
    size, mean, std = model.image_settings(assets["clip"], raw)
    clf = model.Classifier(net, "clip-prompt", tuple(CLASSES), tok)
    data = dataset.load(assets["data"], tuple(CLASSES), size, 0.25, 0, 0.0)
    rt = train.Runtime(torch.device("cpu"), None)
    images, labels, figures = distill.distill(
        clf.features,
        data.train,
        2,
        config.DistillSettings(images_per_class=2, iterations=3, real_batch=8),
        train.normalizer(mean, std, rt.device),
        0,
        rt,
        log=lambda _: None,
    )
    assert images.shape == (4, 3, size, size) and labels.tolist() == [0, 0, 1, 1]
    # 3 iterations x 2 classes x (8 real + 2 synthetic images).
    assert figures["imagesPerSecond"] == pytest.approx(60 / figures["seconds"])
