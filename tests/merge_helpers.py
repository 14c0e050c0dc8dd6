"""Adapters on disk, in the layout the trainer publishes, for the merger's tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from medforge_common.manifest import Manifest, digest_of

BASE = "sha256:" + "b" * 64
MODULES = ("vision.layers.0.q_proj", "vision.layers.0.v_proj", "vision.layers.1.q_proj")
D, K = 32, 24


def make_adapter(
    directory: Path,
    rank: int,
    seed: int,
    alpha: float = 16.0,
    base: str = BASE,
    modules: tuple[str, ...] = MODULES,
    d: int = D,
) -> tuple[str, dict[str, torch.Tensor]]:
    """Writes adapter.safetensors and manifest.json; returns (manifest digest, tensors)."""
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for m in modules:
        tensors[f"{m}.lora_A.weight"] = torch.randn(rank, K, generator=g)
        tensors[f"{m}.lora_B.weight"] = torch.randn(d, rank, generator=g)
    save_file(tensors, str(directory / "adapter.safetensors"))
    manifest = Manifest(
        "contribution", base, meta={"rank": rank, "alpha": alpha, "task": f"t{seed}"}
    )
    manifest.add_file(directory / "adapter.safetensors")
    body = manifest.to_json().encode()
    (directory / "manifest.json").write_bytes(body)
    return digest_of(body), tensors


def files(directory: Path) -> list[dict[str, str]]:
    return [{"name": p.name, "path": str(p)} for p in sorted(directory.iterdir())]


def dense(tensors: dict[str, torch.Tensor], module: str, scale: float) -> torch.Tensor:
    return (
        scale
        * tensors[f"{module}.lora_B.weight"].double()
        @ tensors[f"{module}.lora_A.weight"].double()
    )


def full_result(term: str, out: Path) -> dict[str, Any]:
    """A merge's full result: the termination message names result.json (written beside the
    composite) and its digest; both are checked here."""
    ref = json.loads(term)
    body = (out / ref["resultFile"]["name"]).read_bytes()
    assert digest_of(body) == ref["resultFile"]["digest"]
    assert len(term.encode()) < 1024  # the message stays small, whatever the result's size
    result: dict[str, Any] = json.loads(body)
    assert result["artifact"]["digest"] == ref["artifact"]["digest"]
    return result
