"""Tiny models built from configs and small generated image datasets with a learnable class signal,
for the trainer's and the merger's tests (nothing is downloaded)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from PIL import Image


def byte_alphabet() -> list[str]:
    """The printable stand-ins for the 256 byte values that byte-level BPE vocabularies use."""
    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    out, extra = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def write_tokenizer(directory: Path) -> dict[str, int]:
    """A character-level CLIP tokenizer (no merges): a real tokenizer with a 514-token vocabulary."""
    from transformers import CLIPTokenizer

    chars = byte_alphabet()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tmp = directory / "_tok"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    (tmp / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"))
    tok.save_pretrained(str(directory))
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()
    return vocab


def tiny_clip(directory: Path, image_size: int = 32, seed: int = 0) -> Path:
    from transformers import CLIPConfig, CLIPModel

    directory.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(directory)
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 64,
            "bos_token_id": vocab["<|startoftext|>"],
            "eos_token_id": vocab["<|endoftext|>"],
            "pad_token_id": vocab["<|endoftext|>"],
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(str(directory))
    return directory


def tiny_vit(directory: Path, image_size: int = 32, seed: int = 0) -> Path:
    from transformers import ViTConfig, ViTModel

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = ViTConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=8,
    )
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(str(directory))
    return directory


def prepare(directory: Path) -> str:
    """manifest.json through the trainer's own CLI; returns the digest."""
    out = subprocess.run(
        [sys.executable, "-m", "medforge_trainer", "--prepare-base-model", str(directory)],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip().splitlines()[-1]


# Each class has its own colour and the position of a bright square: learnable, not trivial
# (noise and random brightness on top).
COLOURS = [(200, 60, 60), (60, 200, 60), (60, 60, 200), (200, 200, 60)]


def make_image(label: int, size: int, gen: torch.Generator, style: int = 0) -> torch.Tensor:
    """`style` shifts which colour and square position stand for which label, so that tasks of
    different institutions use the same visual cues for different classes (they interfere)."""
    tint = COLOURS[(label + style) % len(COLOURS)]
    colour = torch.tensor(tint, dtype=torch.float32).view(3, 1, 1)
    img = colour * (0.6 + 0.4 * torch.rand(1, generator=gen)) + 50 * torch.randn(
        3, size, size, generator=gen
    )
    q = size // 4
    y, x = divmod((label + 2 * style) % 4, 2)
    img[:, y * 2 * q : y * 2 * q + q, x * 2 * q : x * 2 * q + q] += 60
    return img.clamp(0, 255).to(torch.uint8)


def make_dataset(
    root: Path,
    classes: list[str],
    per_class: int,
    size: int = 32,
    seed: int = 0,
    style: int = 0,
) -> Path:
    gen = torch.Generator().manual_seed(seed)
    for label, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = make_image(label, size, gen, style).permute(1, 2, 0).numpy()
            Image.fromarray(arr).save(root / c / f"img{i:04d}.png")
    return root


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
