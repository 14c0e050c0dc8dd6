"""An ImageFolder dataset (one folder per class) decoded once into uint8 tensors, checked against
the task's classes, split into train and validation deterministically by seed."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from medforge_trainer.errors import TrainFailed

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# Larger images are skipped before they are decoded: a decompression bomb (a small file that
# expands to gigabytes) must not take the pod down. 64 megapixels is far above medical tiles.
MAX_PIXELS = 8192 * 8192


@dataclass
class Split:
    images: torch.Tensor  # uint8, n x 3 x H x W
    labels: torch.Tensor  # int64, n


@dataclass
class LoadedDataset:
    train: Split
    validation: Split
    fingerprint: str
    corrupt: int  # unreadable or over MAX_PIXELS, skipped
    total: int
    outside: int = 0  # links that lead out of the dataset's folder, never followed


def scan(root: Path, classes: tuple[str, ...]) -> dict[str, list[Path]]:
    """Image files per class folder; names the folders that do not match the task's classes."""
    if not root.is_dir():
        raise TrainFailed(f"dataset unreadable: {root} is not a directory")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise TrainFailed(
            f"dataset unreadable: {root} holds no class folders (expected ImageFolder layout: "
            "<class>/<image>)"
        )
    missing = [c for c in classes if c not in folders]
    extra = [f for f in folders if f not in classes]
    if missing or extra:
        parts = []
        if missing:
            parts.append("no folder for class(es) " + ", ".join(missing))
        if extra:
            parts.append("folder(s) " + ", ".join(extra) + " are not in task.classes")
        raise TrainFailed("class mismatch: " + "; ".join(parts))
    files: dict[str, list[Path]] = {}
    for c in classes:
        found = sorted(
            p
            for p in (root / c).rglob("*")
            if p.is_file()
            and p.suffix.lower() in IMAGE_SUFFIXES
            and not p.name.startswith(".")
            and inside(root, p)
        )
        if not found:
            raise TrainFailed(f"empty class: {c}/ holds no images")
        files[c] = found
    return files


def inside(root: Path, path: Path) -> bool:
    """Whether a file, links resolved, lies in the dataset's folder (a link to /etc/... or to
    another mount is never read)."""
    return path.resolve().is_relative_to(root.resolve())


def links_outside(root: Path) -> int:
    return sum(1 for p in root.rglob("*") if p.is_symlink() and not inside(root, p))


def fingerprint(root: Path, files: dict[str, list[Path]]) -> str:
    """Identifies the data by file names and sizes only, never by content."""
    h = hashlib.sha256()
    for c in sorted(files):
        for p in files[c]:
            h.update(f"{p.relative_to(root).as_posix()}\t{p.stat().st_size}\n".encode())
    return "sha256:" + h.hexdigest()


def decode(path: Path, size: int) -> torch.Tensor | None:
    """3 x size x size uint8, or None for a file that is not a readable image."""
    try:
        with Image.open(path) as src:  # reads the header only
            width, height = src.size
            if width * height > MAX_PIXELS:
                return None
            rgb = src.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
            data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError):
        return None
    return data.view(size, size, 3).permute(2, 0, 1).contiguous()


def load(
    root: Path,
    classes: tuple[str, ...],
    image_size: int,
    validation_fraction: float,
    seed: int,
    max_corrupt_fraction: float,
) -> LoadedDataset:
    files = scan(root, classes)
    total = sum(len(v) for v in files.values())
    gen = torch.Generator().manual_seed(seed)
    train_x: list[torch.Tensor] = []
    train_y: list[int] = []
    val_x: list[torch.Tensor] = []
    val_y: list[int] = []
    corrupt: list[Path] = []
    for label, c in enumerate(classes):
        decoded = []
        for p in files[c]:
            img = decode(p, image_size)
            if img is None:
                corrupt.append(p)
            else:
                decoded.append(img)
        if not decoded:
            raise TrainFailed(f"empty class: no image in {c}/ could be decoded")
        # Stratified and seeded: the same files land in validation on every run.
        order = torch.randperm(len(decoded), generator=gen).tolist()
        n_val = min(len(decoded) - 1, max(1, math.ceil(validation_fraction * len(decoded))))
        if len(decoded) == 1:
            n_val = 0
        for rank, i in enumerate(order):
            (val_x if rank < n_val else train_x).append(decoded[i])
            (val_y if rank < n_val else train_y).append(label)
    if corrupt and len(corrupt) > max_corrupt_fraction * total:
        raise TrainFailed(
            f"corrupt images: {len(corrupt)} of {total} files cannot be decoded (more than "
            f"{max_corrupt_fraction:.0%}), e.g. {corrupt[0].relative_to(root)}"
        )
    if corrupt:
        print(
            f"skipped {len(corrupt)} unreadable or oversized image(s) of {total}, e.g. "
            f"{corrupt[0].relative_to(root)}",
            flush=True,
        )
    outside = links_outside(root)
    if outside:
        print(f"skipped {outside} link(s) that lead out of the dataset's folder", flush=True)
    if not val_x:
        raise TrainFailed("dataset too small: no image is left for validation")

    def stack(xs: list[torch.Tensor], ys: list[int]) -> Split:
        return Split(torch.stack(xs), torch.tensor(ys, dtype=torch.long))

    return LoadedDataset(
        stack(train_x, train_y),
        stack(val_x, val_y),
        fingerprint(root, files),
        len(corrupt),
        total,
        outside,
    )
