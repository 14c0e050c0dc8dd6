"""Test helpers over `medforge_ml.synthetic` (tiny models from configs, generated image
sets): the base-model manifest through the trainer's CLI, and a job config for by-hand runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from medforge_ml.synthetic import make_dataset, make_image, tiny_clip, tiny_vit

__all__ = ["job_config", "make_dataset", "make_image", "prepare", "tiny_clip", "tiny_vit"]


def prepare(directory: Path) -> str:
    """manifest.json through the trainer's own CLI; returns the digest."""
    out = subprocess.run(
        [sys.executable, "-m", "medforge_trainer", "--prepare-base-model", str(directory)],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip().splitlines()[-1]


def job_config(
    base: Path,
    digest: str,
    data: Path,
    classes: list[str],
    head: str = "clip-prompt",
    **overrides: Any,
) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "kind": "train",
        "baseModel": {"uri": str(base), "digest": digest, "path": str(base)},
        "task": {"name": "toy", "classes": classes, "head": head},
        "dataset": {"uri": str(data), "validationFraction": 0.25},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, "targetModules": ["q_proj", "v_proj"]},
        "training": {"epochs": 4, "batchSize": 16, "learningRate": 0.005, "seed": 0},
        "distillation": {"imagesPerClass": 0},
        "output": {},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg
