"""A composite revision outside the forge: its updates applied to the base model, its tasks'
heads on top, class probabilities out; the same arithmetic the merger scores with (updates
added to the base weights; a mixture as the softmax of its coefficient-weighted class
probabilities). Used by `medforge predict`, `evaluate` and `composite pull --format merged`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import safe_open
from torch import nn

from medforge_common.artifacts import ADAPTER_FILE, MIXTURE_FILE, TASKS_FILE
from medforge_ml import classifier
from medforge_ml.errors import ModelError

Deltas = dict[str, torch.Tensor]
SUFFIX_A, SUFFIX_B, SUFFIX_DELTA = ".lora_A.weight", ".lora_B.weight", ".delta.weight"
MAX_PIXELS = 64_000_000  # as the trainer: a decompression bomb is refused, not decoded


@dataclass
class TaskHead:
    name: str
    classes: list[str]
    head: str
    weights: dict[str, torch.Tensor] = field(default_factory=dict)


def read_tasks(path: Path) -> list[TaskHead]:
    """The tasks of a composite (tasks.safetensors): names, classes, heads; not their images."""
    if not path.is_file():
        raise ModelError(
            f"{path.name}: the revision carries no tasks (it was merged without "
            "distilled sets), so it has no class names to predict"
        )
    with safe_open(str(path), framework="pt") as f:
        info = json.loads((f.metadata() or {}).get("tasks", "[]"))
        return [
            TaskHead(
                str(t["name"]),
                [str(c) for c in t["classes"]],
                str(t["head"]),
                {
                    k.removeprefix(f"task{i}.head."): f.get_tensor(k).float()
                    for k in f.keys()  # noqa: SIM118
                    if k.startswith(f"task{i}.head.")
                },
            )
            for i, t in enumerate(info)
        ]


def read_updates(directory: Path) -> list[tuple[float, Deltas]]:
    """(coefficient, dense updates) per adapter: one with coefficient 1 for a merged composite,
    one per contribution for a mixture."""
    if (directory / MIXTURE_FILE).is_file():
        with safe_open(str(directory / MIXTURE_FILE), framework="pt") as f:
            meta = f.metadata() or {}
            coefficients = [float(c) for c in json.loads(meta["coefficients"])]
            out: list[tuple[float, Deltas]] = [(c, {}) for c in coefficients]
            for key in f.keys():  # noqa: SIM118
                if key.endswith(SUFFIX_A):
                    head, _, module = key[: -len(SUFFIX_A)].partition(".")
                    b = f.get_tensor(f"{head}.{module}{SUFFIX_B}").float()
                    out[int(head[1:])][1][module] = b @ f.get_tensor(key).float()
        return out
    if not (directory / ADAPTER_FILE).is_file():
        raise ModelError(f"{directory}: neither {ADAPTER_FILE} nor {MIXTURE_FILE}")
    return [(1.0, file_deltas(directory / ADAPTER_FILE))]


def file_deltas(path: Path) -> Deltas:
    """Dense updates of a composite written by the exact strategies (factors or deltas)."""
    deltas: Deltas = {}
    with safe_open(str(path), framework="pt") as f:
        for k in sorted(f.keys()):
            if k.endswith(SUFFIX_DELTA):
                deltas[k.removesuffix(SUFFIX_DELTA)] = f.get_tensor(k).float()
            elif k.endswith(SUFFIX_A):
                m = k.removesuffix(SUFFIX_A)
                deltas[m] = f.get_tensor(m + SUFFIX_B).float() @ f.get_tensor(k).float()
    return deltas


def add_updates(model: nn.Module, deltas: Deltas, sign: float = 1.0) -> None:
    """Add (or with sign -1 take away) dense updates to the base model's linear layers."""
    with torch.no_grad():
        for name, delta in deltas.items():
            try:
                mod = model.get_submodule(name.removeprefix("backbone."))
            except AttributeError as exc:
                raise ModelError(f"the base model has no module {name}: wrong base model?") from exc
            weight = mod.weight
            if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != tuple(delta.shape):
                raise ModelError(f"{name}: the update does not fit the base model's weight")
            weight += sign * delta.to(device=weight.device, dtype=weight.dtype)


def load_image(path: Path, size: int) -> torch.Tensor:
    """3 x size x size uint8, decoded as the trainer decodes (RGB, bicubic resize)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as src:
            if src.size[0] * src.size[1] > MAX_PIXELS:
                raise ModelError(f"{path}: {src.size[0]}x{src.size[1]} pixels is too large")
            rgb = src.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
            data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ModelError(f"{path}: not a readable image ({exc})".splitlines()[0]) from exc
    return data.view(size, size, 3).permute(2, 0, 1).contiguous()


class Predictor:
    """A composite revision (a pulled folder) on its verified base model."""

    def __init__(
        self,
        base_dir: Path,
        composite_dir: Path,
        device: str = "cpu",
        tasks: list[TaskHead] | None = None,
    ) -> None:
        """`tasks`: the heads to score with, when not the revision's own (an evaluation site
        receives its own head only, never the revision's tasks file)."""
        self.device = torch.device(device)
        self.base, tokenizer, config = classifier.load_base(base_dir)
        self.size, mean, std = classifier.image_settings(base_dir, config)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std).view(1, 3, 1, 1) * 255
        self.tasks = tasks if tasks is not None else read_tasks(composite_dir / TASKS_FILE)
        self.updates = read_updates(composite_dir)
        self.classifiers: dict[str, classifier.Classifier] = {}
        for t in self.tasks:
            clf = classifier.Classifier(self.base, t.head, tuple(t.classes), tokenizer)
            if t.head == "linear":
                clf.head.load_state_dict(t.weights)
            self.classifiers[t.name] = clf.eval().to(self.device)
        self.base.to(self.device)
        if len(self.updates) == 1:
            add_updates(self.base, self.updates[0][1])  # once: a merged composite is one model

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return ((images.float() - self.mean) / self.std).to(self.device)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor, batch: int = 64) -> dict[str, torch.Tensor]:
        """Per task, n x classes probabilities for uint8 images (n x 3 x size x size)."""
        out: dict[str, list[torch.Tensor]] = {t.name: [] for t in self.tasks}
        for i in range(0, len(images), batch):
            x = self.normalise(images[i : i + batch])
            for name, probs in self._batch(x).items():
                out[name].append(probs.cpu())
        return {k: torch.cat(v) for k, v in out.items()}

    def _batch(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if len(self.updates) == 1:
            return {n: torch.softmax(c(x).float(), dim=-1) for n, c in self.classifiers.items()}
        # A mixture: each adapter's class probabilities, weighted, then a softmax (as searched).
        scores: dict[str, torch.Tensor] = {}
        for w, deltas in self.updates:
            add_updates(self.base, deltas)
            try:
                for n, c in self.classifiers.items():
                    q = w * torch.softmax(c(x).float(), dim=-1)
                    scores[n] = scores[n] + q if n in scores else q
            finally:
                add_updates(self.base, deltas, sign=-1.0)
        return {n: torch.softmax(s, dim=-1) for n, s in scores.items()}


def write_merged(base_dir: Path, composite_dir: Path, out: Path) -> None:
    """The base model with the composite's update folded into its weights, in the
    save_pretrained layout (safetensors), with the base model's tokenizer and configs."""
    import shutil

    updates = read_updates(composite_dir)
    if len(updates) != 1:
        raise ModelError(
            "a mixture is several models weighted per input: it has no single "
            "merged model; use medforge predict on the pulled folder"
        )
    model, _, _ = classifier.load_base(base_dir)
    add_updates(model, updates[0][1])
    cast(Any, model).save_pretrained(str(out), safe_serialization=True)
    for p in base_dir.rglob("*"):
        rel = p.relative_to(base_dir)
        target = out / rel
        if (
            p.is_file()
            and not target.exists()
            and p.suffix != ".safetensors"
            and rel.name != "manifest.json"
        ):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, target)
