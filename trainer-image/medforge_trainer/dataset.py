"""An ImageFolder dataset (one folder per class) decoded once into uint8 tensors, checked against
the task's classes, split into train and validation deterministically by seed.

Decoding runs on as many threads as the pod has CPUs (PIL releases the GIL while it decodes and
resizes). A dataset whose decoded images would take more than the memory budget (half of what
the pod has available, by default) is decoded into files on disk and read back through the
page cache, chunk by chunk, instead of failing."""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from medforge_trainer.errors import TrainFailed

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# Larger images are skipped before they are decoded: a decompression bomb (a small file that
# expands to gigabytes) must not take the pod down. 64 megapixels is far above medical tiles.
MAX_PIXELS = 8192 * 8192


@dataclass
class Split:
    images: torch.Tensor  # uint8, n x 3 x H x W (in memory, or mapped from a file on disk)
    labels: torch.Tensor  # int64, n
    on_disk: bool = False  # read in chunks (CHUNK images), not at random


@dataclass
class LoadedDataset:
    train: Split
    validation: Split
    fingerprint: str
    corrupt: int  # unreadable or over MAX_PIXELS, skipped
    total: int
    outside: int = 0  # links that lead out of the dataset's folder, never followed
    decode_images_per_second: float = float("nan")
    workers: int = 1
    files: list[str] = field(default_factory=list)  # file_fingerprints of every file scanned


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


def file_fingerprints(root: Path, files: dict[str, list[Path]]) -> list[str]:
    """One hash per file, of its path in the dataset and its size (never its content), sorted:
    an evaluation set counts how many of its files a training set of the same hospital held."""
    out = []
    for c in sorted(files):
        for p in files[c]:
            line = f"{p.relative_to(root).as_posix()}\t{p.stat().st_size}"
            out.append(hashlib.sha256(line.encode()).hexdigest()[:32])
    return sorted(out)


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


CHUNK = 4096  # images read together from a dataset on disk


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity, capped by its cgroup's CPU quota."""
    n = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def memory_budget() -> int:
    """Bytes the decoded images may take in memory: half of what is available (the smaller of
    the kernel's MemAvailable and the cgroup's limit less its usage)."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            left = int(limit) - used
            available = left if available is None else min(available, left)
    except (OSError, ValueError):
        pass
    return (available or 8 << 30) // 2


Images = np.ndarray[Any, np.dtype[np.uint8]]


def _array(shape: tuple[int, ...], spill: Path | None, name: str) -> Images:
    if spill is None:
        return np.empty(shape, dtype=np.uint8)
    spill.mkdir(parents=True, exist_ok=True)
    out: Images = np.memmap(spill / f"{name}.u8", dtype=np.uint8, mode="w+", shape=shape)
    return out


def _gather(store: Images, rows: list[int], spill: Path | None, name: str) -> torch.Tensor:
    """The given rows of the decoded images, as their own array (on disk too when spilled)."""
    out = _array((len(rows), *store.shape[1:]), spill, name)
    for i in range(0, len(rows), CHUNK):
        out[i : i + CHUNK] = store[rows[i : i + CHUNK]]
    return torch.from_numpy(out)


def _decode_all(
    ordered: list[tuple[int, Path]], size: int, store: Images, workers: int
) -> tuple[list[bool], float]:
    """Each file decoded into its row of `store` on `workers` threads: (decoded or not, images
    per second)."""

    def decode_into(i: int) -> bool:
        img = decode(ordered[i][1], size)
        if img is None:
            return False
        store[i] = img.numpy()
        return True

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        ok = list(pool.map(decode_into, range(len(ordered))))
    return ok, len(ordered) / max(time.perf_counter() - t0, 1e-9)


def _stratify(
    ordered: list[tuple[int, Path]],
    ok: list[bool],
    classes: tuple[str, ...],
    validation_fraction: float,
    seed: int,
) -> tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]:
    """((train rows, labels), (validation rows, labels)): stratified and seeded, so the same
    files land in validation on every run."""
    gen = torch.Generator().manual_seed(seed)
    train: tuple[list[int], list[int]] = ([], [])
    val: tuple[list[int], list[int]] = ([], [])
    for label, c in enumerate(classes):
        decoded = [i for i, (lab, _) in enumerate(ordered) if lab == label and ok[i]]
        if not decoded:
            raise TrainFailed(f"empty class: no image in {c}/ could be decoded")
        order = torch.randperm(len(decoded), generator=gen).tolist()
        n_val = min(len(decoded) - 1, max(1, math.ceil(validation_fraction * len(decoded))))
        if len(decoded) == 1:
            n_val = 0
        for rank, i in enumerate(order):
            part = val if rank < n_val else train
            part[0].append(decoded[i])
            part[1].append(label)
    return train, val


def load(
    root: Path,
    classes: tuple[str, ...],
    image_size: int,
    validation_fraction: float,
    seed: int,
    max_corrupt_fraction: float,
    spill_dir: Path | None = None,
    budget: int | None = None,
    workers: int | None = None,
) -> LoadedDataset:
    """Decode, check and split. When the decoded images would take more than `budget` bytes
    (default: memory_budget()), they go to files under `spill_dir` (the job's work folder;
    default: a new temporary folder, the caller's to remove) and are read back from there."""
    files = scan(root, classes)
    total = sum(len(v) for v in files.values())
    ordered = [(label, p) for label, c in enumerate(classes) for p in files[c]]
    shape = (total, 3, image_size, image_size)
    spill = None
    if math.prod(shape) > (memory_budget() if budget is None else budget):
        spill = spill_dir or Path(tempfile.mkdtemp(prefix="medforge-decoded-"))
    store = _array(shape, spill, "all")
    workers = workers or usable_cpus()
    ok, rate = _decode_all(ordered, image_size, store, workers)
    corrupt = [p for (_, p), good in zip(ordered, ok, strict=True) if not good]
    if corrupt and len(corrupt) > max_corrupt_fraction * total:
        raise TrainFailed(
            f"corrupt images: {len(corrupt)} of {total} files cannot be decoded (more than "
            f"{max_corrupt_fraction:.0%}), e.g. {corrupt[0].relative_to(root)}"
        )
    train, val = _stratify(ordered, ok, classes, validation_fraction, seed)
    if corrupt:
        print(
            f"skipped {len(corrupt)} unreadable or oversized image(s) of {total}, e.g. "
            f"{corrupt[0].relative_to(root)}",
            flush=True,
        )
    outside = links_outside(root)
    if outside:
        print(f"skipped {outside} link(s) that lead out of the dataset's folder", flush=True)
    if not val[0]:
        raise TrainFailed("dataset too small: no image is left for validation")
    if spill is not None:
        print(
            f"decoded images ({math.prod(shape) / 2**30:.1f} GiB) exceed the memory budget: "
            f"kept on disk under {spill} and read in chunks of {CHUNK}",
            flush=True,
        )
    splits = [
        Split(_gather(store, rows, spill, name), torch.tensor(ys, dtype=torch.long), bool(spill))
        for (rows, ys), name in ((train, "train"), (val, "validation"))
    ]
    if spill is not None:
        (spill / "all.u8").unlink(missing_ok=True)  # the splits hold their own copies
    out = LoadedDataset(
        splits[0], splits[1], fingerprint(root, files), len(corrupt), total, outside, rate, workers
    )
    out.files = file_fingerprints(root, files)
    return out
