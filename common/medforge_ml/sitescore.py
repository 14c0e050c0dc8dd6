"""Scoring a composite revision on one site's own images (`medforge-evaluate`): the revision's
update on the verified base model, the site's own head for its task (never another hospital's),
and the aggregate figures that may leave the site: accuracy, macro-F1, ROC-AUC, per-class
recall and the sample count."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from medforge_common.manifest import Manifest, ManifestError, digest_of, verify_file
from medforge_ml.basemodel import get_file
from medforge_ml.composite import Predictor, TaskHead
from medforge_ml.errors import ModelError
from medforge_ml.metrics import classification_metrics, per_class_recall


def fetch_listed(what: str, digest: str, files: list[dict[str, Any]], dest: Path) -> Manifest:
    """Some files of an artifact (`files`: {name, url} from the operator, or {name, path} by
    hand, its manifest.json among them) into `dest`: the manifest must hash to `digest` and
    each file must match its manifest entry. Files of the artifact that were not given are not
    needed (and never fetched)."""
    dest.mkdir(parents=True, exist_ok=True)
    by_name = {str(f["name"]): f for f in files}
    if "manifest.json" not in by_name:
        raise ModelError(f"{what}: its manifest.json is not among the files given")
    get_file(by_name["manifest.json"], dest / "manifest.json", f"{what} manifest")
    raw = (dest / "manifest.json").read_bytes()
    if digest_of(raw) != digest:
        raise ModelError(f"{what}: manifest.json does not hash to {digest[:19]}...")
    try:
        manifest = Manifest.from_json(raw.decode(), f"{what} manifest.json")
    except (ManifestError, UnicodeDecodeError) as exc:
        raise ModelError(f"{what}: {exc}") from exc
    entries = {e.name: e for e in manifest.files}
    for name, spec in by_name.items():
        if name == "manifest.json":
            continue
        if name not in entries:
            raise ModelError(f"{what}: {name} is not listed in its manifest")
        get_file(spec, dest / name, f"{what} {name}")
        try:
            verify_file(dest / name, entries[name])
        except ManifestError as exc:
            raise ModelError(f"{what}: {exc}") from exc
    return manifest


def read_head(path: Path) -> dict[str, torch.Tensor]:
    """A contribution's linear head (head.safetensors) as the classifier loads it."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k.removeprefix("head."): f.get_tensor(k).float() for k in f.keys()}  # noqa: SIM118


def score(
    base_dir: Path, revision_dir: Path, head: TaskHead, images: torch.Tensor, labels: torch.Tensor
) -> dict[str, Any]:
    """One revision's figures on the site's images (uint8, n x 3 x size x size)."""
    pred = Predictor(base_dir, revision_dir, tasks=[head])
    probs = pred.probabilities(images)[head.name]
    out: dict[str, Any] = dict(classification_metrics(labels, probs))
    out["recall"] = per_class_recall(labels, probs.argmax(dim=1), head.classes)
    out["classes"] = len(head.classes)
    return out


def image_size(base_dir: Path) -> int:
    """The side the base model's image processor resizes to."""
    from transformers import AutoConfig

    from medforge_ml import classifier

    try:
        config = AutoConfig.from_pretrained(str(base_dir)).to_dict()
    except (OSError, ValueError) as exc:
        raise ModelError(f"base model config cannot be read ({exc})".splitlines()[0]) from exc
    size, _, _ = classifier.image_settings(base_dir, config)
    return int(size)
