"""The tasks a composite is scored on: each contribution's distilled summary set (images already
normalised for the base model, with labels), its classes and head. A composite carries the sets
of every task merged so far in `tasks.safetensors`, so that an incremental revision can search
and evaluate on all of them without reading earlier contributions again."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from medforge_common.artifacts import DISTILLED_FILE, HEAD_FILE


@dataclass
class Task:
    name: str
    classes: list[str]
    head: str
    images: torch.Tensor
    labels: torch.Tensor
    head_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    solo: dict[str, Any] = field(default_factory=dict)  # the contribution's own scores


def from_contribution(directory: Path, meta: dict[str, Any]) -> Task | None:
    """The task of a verified contribution, or None when it carries no distilled set."""
    path = directory / DISTILLED_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        images = f.get_tensor("images").float()
        labels = f.get_tensor("labels").long()
    head: dict[str, torch.Tensor] = {}
    if (directory / HEAD_FILE).is_file():
        with safe_open(str(directory / HEAD_FILE), framework="pt") as f:
            head = {k.removeprefix("head."): f.get_tensor(k).float() for k in f.keys()}  # noqa: SIM118
    return Task(
        str(meta.get("task", directory.name)),
        [str(c) for c in meta.get("classes") or []],
        str(meta.get("head", "clip-prompt")),
        images,
        labels,
        head,
    )


def load_bundle(path: Path) -> list[Task]:
    with safe_open(str(path), framework="pt") as f:
        info = json.loads((f.metadata() or {}).get("tasks", "[]"))
        out = []
        for i, t in enumerate(info):
            head = {
                k.removeprefix(f"task{i}.head."): f.get_tensor(k).float()
                for k in f.keys()  # noqa: SIM118
                if k.startswith(f"task{i}.head.")
            }
            out.append(
                Task(
                    t["name"],
                    t["classes"],
                    t["head"],
                    f.get_tensor(f"task{i}.images").float(),
                    f.get_tensor(f"task{i}.labels").long(),
                    head,
                    t.get("solo") or {},
                )
            )
    return out


def save_bundle(tasks: list[Task], path: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    info = []
    for i, t in enumerate(tasks):
        tensors[f"task{i}.images"] = t.images.contiguous()
        tensors[f"task{i}.labels"] = t.labels.contiguous()
        for k, v in t.head_weights.items():
            tensors[f"task{i}.head.{k}"] = v.contiguous()
        info.append({"name": t.name, "classes": t.classes, "head": t.head, "solo": t.solo})
    save_file(tensors, str(path), metadata={"tasks": json.dumps(info)})
