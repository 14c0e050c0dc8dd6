"""Tiny models built from configs and synthetic image sets with a learnable class signal.

For trying MedForge without patient data or downloads (`make demo`, the tests, a hospital's
first smoke test of an installation): a CLIP with a real character-level tokenizer, a ViT, and
ImageFolder datasets whose classes differ by colour and by the position of a bright square.
"""

from __future__ import annotations

import json
from pathlib import Path

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


def tiny_clip(
    directory: Path,
    image_size: int = 32,
    seed: int = 0,
    *,
    width: int = 32,
    layers: int = 2,
    patch: int = 8,
) -> Path:
    """A CLIP built from a config (random weights): by default a 2-layer, 32-wide vision tower
    with 8 px patches; the merge benchmarks ask for a larger one."""
    from transformers import CLIPConfig, CLIPModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

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
            "hidden_size": width,
            "intermediate_size": 2 * width,
            "num_hidden_layers": layers,
            "num_attention_heads": max(width // 16, 1),
            "image_size": image_size,
            "patch_size": patch,
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


# Each class has its own colour and the position of a bright square: learnable, not trivial
# (noise and random brightness on top).
COLOURS = [(200, 60, 60), (60, 200, 60), (60, 60, 200), (200, 200, 60)]


def make_image(
    label: int, size: int, gen: torch.Generator, style: int = 0, noise: float = 50.0
) -> torch.Tensor:
    """`style` shifts which colour and square position stand for which label, so that tasks of
    different institutions use the same visual cues for different classes (they interfere)."""
    tint = COLOURS[(label + style) % len(COLOURS)]
    colour = torch.tensor(tint, dtype=torch.float32).view(3, 1, 1)
    img = colour * (0.6 + 0.4 * torch.rand(1, generator=gen)) + noise * torch.randn(
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
    noise: float = 50.0,
) -> Path:
    gen = torch.Generator().manual_seed(seed)
    for label, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = make_image(label, size, gen, style, noise).permute(1, 2, 0).numpy()
            Image.fromarray(arr).save(root / c / f"img{i:04d}.png")
    return root
