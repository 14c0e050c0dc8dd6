"""The synthetic three-institution setup: one tiny CLIP, three hospitals with their own tasks
(2, 3 and 2 classes whose visual cues overlap), adapters trained by medforge-train with distilled
sets, merged by medforge-merge, scored on held-out images nobody trained or searched on.

The base is random by default, so each adapter carries everything its task needs. With
`pretrained=True` the base is first trained briefly on a few "public" images of every task (full
parameters), so that it already scores above chance and the adapters refine it: the regime of the
MedForge paper, where adapters sit on a pretrained CLIP."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from medforge_common.artifacts import MIXTURE_FILE
from medforge_common.manifest import Manifest
from medforge_merger.__main__ import main as merge_main
from medforge_merger.evaluate import Evaluator
from medforge_merger.mixture import Mixture
from medforge_merger.search import dense
from medforge_merger.strategies import Factors
from medforge_merger.tasks import Task
from medforge_ml.composite import file_deltas
from medforge_trainer import dataset, model
from medforge_trainer.__main__ import main as train_main
from tests.train_helpers import job_config, make_dataset, prepare, tiny_clip

INSTITUTIONS = [
    ("breakhis", ["benign", "malignant"], 0),
    ("lung", ["adenocarcinoma", "benign tissue", "squamous"], 1),
    ("colon", ["normal", "tumor"], 2),
]


PUBLIC_PER_CLASS = 4  # few and briefly: the base should know something, not everything
PUBLIC_LEARNING_RATE = 3e-4


def pretrain(base: Path, seed: int, noise: float) -> None:
    """One epoch of full-parameter training of the vision tower on a few public images of every
    task (CLIP-prompt cross-entropy), saved over the base: a foundation model in miniature."""
    loaded_base, tokenizer, _config = model.load_base(base)
    clip: Any = loaded_base
    public = []
    for i, (task, classes, style) in enumerate(INSTITUTIONS):
        data = make_dataset(
            base.parent / "public" / task,
            classes,
            PUBLIC_PER_CLASS,
            seed=7000 + 100 * seed + i,
            style=style,
            noise=noise,
        )
        images, labels = all_images(base, data, classes, validation=0.0)
        head = model.Classifier(clip, "clip-prompt", tuple(classes), tokenizer)
        public.append((head, images, labels))
    train_vision(clip, public, seed, PUBLIC_LEARNING_RATE, epochs=1)
    clip.save_pretrained(str(base))


def train_vision(
    clip: Any, sets: list[tuple[Any, torch.Tensor, torch.Tensor]], seed: int, lr: float, epochs: int
) -> None:
    """Full-parameter training of the vision tower on (head, images, labels) sets, batches of 16
    (CLIP-prompt cross-entropy): the public pretraining of the merge benchmarks' bases."""
    params = [*clip.vision_model.parameters(), *clip.visual_projection.parameters()]
    for p in params:
        p.requires_grad_(True)
    clip.train()
    opt = torch.optim.AdamW(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for head, images, labels in sets:
            order = torch.randperm(len(labels), generator=gen)
            for b in range(0, len(order), 16):
                idx = order[b : b + 16]
                loss = torch.nn.functional.cross_entropy(head(images[idx]), labels[idx])
                opt.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
    clip.eval()


@dataclass
class Setup:
    base: Path
    digest: str
    adapters: list[Path]
    heldout: list[Task]
    # The hospitals' task names, in the adapters' order (the three institutions by default).
    names: list[str] = field(default_factory=lambda: [t[0] for t in INSTITUTIONS])


def build(
    root: Path,
    seed: int = 0,
    per_class: int = 40,
    ipc: int = 10,
    iters: int = 300,
    pretrained: bool = False,
    noise: float = 50.0,
) -> Setup:
    base = tiny_clip(root / "clip", seed=seed)
    if pretrained:
        pretrain(base, seed, noise)
    digest = prepare(base)
    adapters = []
    for i, (task, classes, style) in enumerate(INSTITUTIONS):
        data = make_dataset(
            root / task / "data", classes, per_class, seed=100 * seed + i, style=style, noise=noise
        )
        cfg = job_config(
            base,
            digest,
            data,
            classes,
            task={"name": task, "classes": classes},
            training={"seed": seed, "epochs": 4},
            distillation={"imagesPerClass": ipc, "iterations": iters},
        )
        (root / task / "job.json").write_text(json.dumps(cfg))
        out = root / task / "adapter"
        rc = train_main(
            [
                "--config",
                str(root / task / "job.json"),
                "--output-dir",
                str(out),
                "--termination-log",
                str(root / task / "term"),
            ]
        )
        assert rc == 0, (root / task / "term").read_text()
        adapters.append(out)
    return Setup(base, digest, adapters, heldout_tasks(base, root, seed, noise))


def all_images(
    base: Path, data: Path, classes: list[str], validation: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of an image set, normalised for the base, and its labels: both parts of
    dataset.load's split (it always holds at least one image per class back), in its order."""
    size, mean, std = model.image_settings(
        base, {"model_type": "clip", "vision_config": {"image_size": 32}}
    )
    m = torch.tensor(mean).view(1, 3, 1, 1) * 255
    s = torch.tensor(std).view(1, 3, 1, 1) * 255
    loaded = dataset.load(data, tuple(classes), size, validation, 0, 0.0)
    images = torch.cat([loaded.train.images, loaded.validation.images]).float()
    labels = torch.cat([loaded.train.labels, loaded.validation.labels])
    return (images - m) / s, labels


def heldout_tasks(base: Path, root: Path, seed: int, noise: float = 50.0) -> list[Task]:
    """30 images per class of every task, normalised for the base, that nobody trains or
    searches on."""
    heldout = []
    for i, (task, classes, style) in enumerate(INSTITUTIONS):
        held = make_dataset(
            root / task / "heldout", classes, 30, seed=100 * seed + 50 + i, style=style, noise=noise
        )
        images, labels = all_images(base, held, classes, validation=0.5)
        heldout.append(Task(task, classes, "clip-prompt", images, labels))
    return heldout


def merge_config(
    setup: Setup, root: Path, strategy: dict[str, Any], name: str, **extra: Any
) -> Path:
    """The merge Job's config for every adapter of the setup, written to root/<name>.json."""
    inputs = []
    for i, d in enumerate(setup.adapters):
        raw = (d / "manifest.json").read_text()
        files = [{"name": f.name, "path": str(d / f.name)} for f in Manifest.from_json(raw).files]
        files.append({"name": "manifest.json", "path": str(d / "manifest.json")})
        inputs.append(
            {
                "namespace": f"hospital-{i}",
                "name": setup.names[i],
                "digest": Manifest.from_json(raw).digest(),
                "files": files,
            }
        )
    cfg = {
        "kind": "merge",
        "baseModel": {"digest": setup.digest, "path": str(setup.base)},
        "strategy": strategy,
        "integration": "full",
        "inputs": inputs,
        "output": {},
        **extra,
    }
    path = root / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def job_args(root: Path, name: str, config: Path) -> list[str]:
    """`medforge-merge`'s arguments: the composite goes to root/<name>, the result line to
    root/<name>.term."""
    return [
        "--config",
        str(config),
        "--output-dir",
        str(root / name),
        "--termination-log",
        str(root / f"{name}.term"),
    ]


def merge(setup: Setup, root: Path, strategy: dict[str, Any], name: str, **extra: Any) -> Path:
    config = merge_config(setup, root, strategy, name, **extra)
    rc = merge_main(job_args(root, name, config))
    assert rc == 0, (root / f"{name}.term").read_text()
    return root / name


def read_factors(path: Path, scale: float = 1.0) -> dict[str, Factors]:
    tensors = load_file(str(path))
    return {
        k.removesuffix(".lora_A.weight"): Factors(
            tensors[k.removesuffix("lora_A.weight") + "lora_B.weight"] * scale, v
        )
        for k, v in tensors.items()
        if k.endswith(".lora_A.weight")
    }


def averaged_ab(setup: Setup) -> dict[str, Factors]:
    """The research code's averaging baseline: lora_A and lora_B tensors averaged separately
    (as peft's linear combination does), cross terms included."""
    maps = [scaled_factors(d) for d in setup.adapters]
    return {
        m: Factors(
            torch.stack([f[m].B for f in maps]).mean(0), torch.stack([f[m].A for f in maps]).mean(0)
        )
        for m in maps[0]
    }


Composite = Path | dict[str, Factors] | Mixture


def heldout_scores(setup: Setup, composite: Composite) -> list[float]:
    """Accuracy per task on the held-out images."""
    ev = Evaluator(setup.base)
    if isinstance(composite, Path) and (composite / MIXTURE_FILE).is_file():
        composite = Mixture.load(composite / MIXTURE_FILE)
    if isinstance(composite, Mixture):
        mix = composite
        return [
            float((mix.probabilities(ev, t).argmax(1) == t.labels).double().mean())
            for t in setup.heldout
        ]
    # A composite file may hold dense layers (ties, dare) besides factors.
    deltas = (
        file_deltas(composite / "adapter.safetensors")
        if isinstance(composite, Path)
        else dense(composite)
    )
    return [
        float((ev.logits(t, deltas).argmax(1) == t.labels).double().mean()) for t in setup.heldout
    ]


def scaled_factors(adapter: Path) -> dict[str, Factors]:
    """An adapter's factors with its alpha/rank scale folded into B."""
    meta = Manifest.from_json((adapter / "manifest.json").read_text()).meta
    return read_factors(adapter / "adapter.safetensors", meta["alpha"] / meta["rank"])


def single_adapter_scores(setup: Setup, i: int) -> list[float]:
    """Held-out accuracy per task of hospital i's adapter alone."""
    return heldout_scores(setup, scaled_factors(setup.adapters[i]))


def experiment(
    root: Path,
    seed: int = 0,
    setup: Setup | None = None,
    every_strategy: bool = False,
    **build_args: Any,
) -> dict[str, Any]:
    """Held-out accuracy per task and its mean for each way of combining the three adapters
    (and of the base alone, and of each hospital's own adapter on its own task). With
    `every_strategy`, the data-free merges too (task arithmetic, ties, dare, the subspace
    merges with their searched scale)."""
    setup = setup or build(root, seed, **build_args)
    uniform = {f"hospital-{i}/{t[0]}": 1 / 3 for i, t in enumerate(INSTITUTIONS)}
    strategies: dict[str, dict[str, Any]] = {
        "uniform": {"type": "linear", "weights": uniform},
        "fusion": {"type": "fusion", "search": {"seed": seed}},
        "fusion-exact": {"type": "fusion-exact", "search": {"seed": seed}},
        "mixture": {"type": "mixture", "search": {"seed": seed}},
    }
    if every_strategy:
        strategies |= {
            "task-arithmetic": {"type": "linear"},
            "ties": {"type": "ties", "density": 0.2},
            "dare-ties": {"type": "dare-ties", "density": 0.5, "search": {"seed": seed}},
            "iso-c": {"type": "iso-c", "search": {"seed": seed}},
            "iso-cts": {"type": "iso-cts", "search": {"seed": seed}},
            "tsv": {"type": "tsv", "search": {"seed": seed}},
            "knots-ties": {"type": "knots-ties", "density": 0.2, "search": {"seed": seed}},
            "core-ties": {"type": "core-ties", "density": 0.2, "search": {"seed": seed}},
        }
    maps = [scaled_factors(d) for d in setup.adapters]
    composites: dict[str, Composite] = {
        "average-ab": averaged_ab(setup),
        # The output-level counterpart of uniform averaging: every adapter's probabilities 1/3.
        "uniform-mixture": Mixture(maps, [1 / 3] * 3, [t[0] for t in INSTITUTIONS]),
    }
    for name, strat in strategies.items():
        composites[name] = merge(setup, root, strat, name)
    scores = {name: heldout_scores(setup, c) for name, c in composites.items()}
    # The best single hospital's adapter, used alone for every task, and the bare base.
    alone = [single_adapter_scores(setup, i) for i in range(len(setup.adapters))]
    scores["best-single"] = max(alone, key=sum)
    # The ceiling of normalised accuracy: each hospital's own adapter on its own task.
    scores["own-adapter"] = [alone[i][i] for i in range(len(alone))]
    scores["base"] = heldout_scores(setup, {})
    return {
        name: {"per_task": [round(x, 4) for x in s], "mean": round(sum(s) / len(s), 4)}
        for name, s in scores.items()
    }
