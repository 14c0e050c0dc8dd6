"""DP-SGD through Opacus, checked rather than assumed (Opacus has had reports of silently wrong
LoRA updates with recent peft versions): with no noise, no clipping and a fixed batch, one
DP-SGD step equals a plain step; with clipping, the gradient is the mean of per-image gradients
each clipped to the norm, computed here image by image; a run spends no more than it was granted
and reports what it spent; delta >= 1/N and a distilled set from a DP run are refused."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from medforge_trainer import config, dataset, model, private, train
from medforge_trainer.errors import ConfigError
from tests.train_helpers import job_config, make_dataset, prepare, tiny_clip

CLASSES = ["benign", "malignant"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("private")
    clip = tiny_clip(root / "clip")
    digest = prepare(clip)
    return {
        "clip": clip,
        "digest": digest,
        "data": make_dataset(root / "data", CLASSES, 24, seed=5),
    }


def classifier(assets: dict[str, Any], head: str = "linear") -> tuple[nn.Module, Any, Any]:
    torch.manual_seed(0)
    net, tok, raw = model.load_base(assets["clip"])
    size, mean, std = model.image_settings(assets["clip"], raw)
    lora = config.LoraSettings(rank=4, alpha=8, dropout=0.0)
    clf = model.add_lora(model.Classifier(net, head, tuple(CLASSES), tok), lora)
    data = dataset.load(assets["data"], tuple(CLASSES), size, 0.25, 0, 0.0)
    return clf, data, train.normalizer(mean, std, torch.device("cpu"))


def trainable(m: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}


def per_image_grads(clf: nn.Module, norm: Any, x: torch.Tensor, y: torch.Tensor) -> list[Any]:
    """Each image's gradient of its own loss, by plain autograd, one image at a time."""
    out = []
    for i in range(len(y)):
        clf.zero_grad(set_to_none=True)
        nn.CrossEntropyLoss()(clf(norm(x[i : i + 1])), y[i : i + 1]).backward()
        out.append(
            {n: torch.clone(p.grad) for n, p in clf.named_parameters() if p.grad is not None}
        )
    return out


@pytest.mark.parametrize("head", ["linear", "clip-prompt"])
def test_one_step_without_noise_or_clipping_equals_a_plain_step(
    assets: dict[str, Any], head: str
) -> None:
    clf, data, norm = classifier(assets, head)
    plain = copy.deepcopy(clf)
    x, y = data.train.images[:8], data.train.labels[:8]
    settings = config.TrainingSettings(epochs=1, batch_size=8, learning_rate=1e-2)
    # Poisson sampling off: a fixed batch, averaged over its real size.
    dp = private.make_private(
        clf, x, y, settings, config.PrivacySettings(1.0, 1e-5, 1e9), 0.0, poisson=False
    )
    ((bx, by),) = list(dp.loader)
    assert torch.equal(by, y)
    dp.optimizer.zero_grad(set_to_none=True)
    nn.CrossEntropyLoss()(dp.module(norm(bx)), by).backward()
    dp.optimizer.step()
    opt = torch.optim.AdamW(
        [p for p in plain.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0
    )
    nn.CrossEntropyLoss()(plain(norm(x)), y).backward()
    opt.step()
    dp.module._close()
    got, want = trainable(clf), trainable(plain)
    assert got.keys() == want.keys() and any("lora_" in k for k in got)
    moved = 0
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
        moved += int(not torch.equal(want[k], trainable(classifier(assets, head)[0])[k]))
    assert moved  # the step changed the adapter: the comparison is not between two copies


def test_clipping_bounds_each_images_gradient(assets: dict[str, Any]) -> None:
    clf, data, norm = classifier(assets)
    x, y = data.train.images[:6], data.train.labels[:6]
    reference = per_image_grads(copy.deepcopy(clf), norm, x, y)
    norms = [torch.sqrt(sum((g**2).sum() for g in grads.values())).item() for grads in reference]
    clip = min(norms) / 2  # every image's gradient is clipped
    settings = config.TrainingSettings(epochs=1, batch_size=6)
    dp = private.make_private(
        clf, x, y, settings, config.PrivacySettings(1.0, 1e-5, clip), 0.0, poisson=False
    )
    dp.optimizer.zero_grad(set_to_none=True)
    nn.CrossEntropyLoss()(dp.module(norm(x)), y).backward()
    dp.optimizer.pre_step()  # clip, add (zero) noise, average: what the step would apply
    names = [n for n, p in clf.named_parameters() if p.requires_grad]
    params = [p for p in clf.parameters() if p.requires_grad]
    for name, p in zip(names, params, strict=True):
        scaled = [
            g[name] * min(1.0, clip / (nrm + 1e-6)) for g, nrm in zip(reference, norms, strict=True)
        ]
        want = torch.stack(scaled).sum(0) / len(y)
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-6, msg=name)
    total = torch.sqrt(torch.stack([(p.grad**2).sum() for p in params if p.grad is not None]).sum())
    assert float(total) <= clip + 1e-6
    dp.module._close()


def test_a_run_spends_no_more_than_it_was_granted(assets: dict[str, Any]) -> None:
    clf, data, norm = classifier(assets)
    privacy = config.PrivacySettings(epsilon=2.0, delta=1e-3, max_grad_norm=1.0)
    settings = config.TrainingSettings(epochs=2, batch_size=6, learning_rate=1e-3)
    before = trainable(clf)
    lines: list[str] = []
    stats, report = private.train_private(
        clf, data.train, settings, privacy, train.Runtime(torch.device("cpu"), None), norm,
        lines.append,
    )  # fmt: skip
    assert 0 < report["epsilon"] <= 2.0 and report["steps"] > 0
    assert report["noiseMultiplier"] > 0 and report["accountant"] == "prv"
    assert report["library"].startswith("opacus ") and report["unit"] == "image"
    assert report["history"] and stats["loss"] == stats["loss"]
    assert any(not torch.equal(before[k], v) for k, v in trainable(clf).items())
    assert "noise multiplier" in lines[0]
    # A budget too small for the run: refused before any step, naming the field.
    tiny = config.PrivacySettings(epsilon=1e-4, delta=1e-3, max_grad_norm=1.0)
    with pytest.raises(private.PrivacyRefused, match=r"privacy\.epsilon: 0\.0001 is too small"):
        private.train_private(
            classifier(assets)[0], data.train, settings, tiny,
            train.Runtime(torch.device("cpu"), None), norm, lambda _: None,
        )  # fmt: skip


def test_refusals_name_the_field() -> None:
    cfg = job_config(Path("/m"), "sha256:" + "a" * 64, Path("/d"), CLASSES)
    cfg["privacy"] = {"epsilon": 3}
    with pytest.raises(ConfigError, match=r"privacy\.delta: required"):
        config.parse(cfg)
    cfg["privacy"] = {"epsilon": 3, "delta": 1e-5, "accountant": "gdp"}
    with pytest.raises(ConfigError, match=r"privacy\.accountant"):
        config.parse(cfg)
    cfg["privacy"] = {"epsilon": 3, "delta": 1e-5}
    cfg["distillation"] = {"imagesPerClass": 2}
    with pytest.raises(ConfigError, match="distilled set cannot be released"):
        config.parse(cfg)
    cfg["distillation"] = {}
    parsed = config.parse(cfg).privacy
    assert parsed == config.PrivacySettings(3.0, 1e-5, 1.0, "prv")
    with pytest.raises(private.PrivacyRefused, match=r"privacy\.delta: .* 1/N"):
        private.check_delta(config.PrivacySettings(3.0, 0.01), 100)
    private.check_delta(config.PrivacySettings(3.0, 0.009), 100)


def test_the_trainer_records_what_it_spent_and_refuses_a_delta_too_large(
    assets: dict[str, Any], tmp_path: Path
) -> None:
    """`medforge-train` with spec.privacy: the manifest's privacy section, and the refusal of a
    delta that is not below 1/N as a one-line reason (exit code 1, no upload)."""
    from medforge_common.manifest import Manifest
    from tests.unit.test_trainer import run_trainer

    cfg = job_config(assets["clip"], assets["digest"], assets["data"], CLASSES, head="linear")
    cfg["privacy"] = {"epsilon": 4, "delta": 1e-3, "maxGradNorm": 0.5, "accountant": "rdp"}
    (tmp_path / "ok").mkdir()
    rc, term, out = run_trainer(tmp_path / "ok", cfg)
    assert rc == 0, term
    meta = Manifest.from_json((out / "manifest.json").read_text()).meta
    spent = meta["privacy"]
    assert 0 < spent["epsilon"] <= 4 and spent["delta"] == 1e-3 and spent["maxGradNorm"] == 0.5
    assert spent["accountant"] == "rdp" and spent["steps"] > 0
    assert json.loads(term)["privacy"]["epsilon"] == spent["epsilon"]
    cfg["privacy"] = {"epsilon": 4, "delta": 0.05}
    (tmp_path / "refused").mkdir()
    rc, term, out = run_trainer(tmp_path / "refused", cfg)
    assert rc != 0 and "privacy.delta" in term and "1/N" in term
    assert not (out / "adapter.safetensors").exists()
