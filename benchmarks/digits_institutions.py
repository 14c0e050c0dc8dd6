"""Merge quality on real images: scikit-learn's bundled handwritten digits (1,797 scans), split
into hospitals that each learn a two-digit task on their own disjoint images, on a tiny CLIP
first trained briefly on a public part disjoint from every hospital's (so that adapters are
small updates of a useful base, as in the paper).

For every strategy: accuracy on each hospital's held-out images divided by that hospital's own
adapter's accuracy on them (normalised accuracy, as the merging literature reports it), its mean
and its minimum over tasks and seeds, with merge seconds.

    .venv/bin/python benchmarks/digits_institutions.py --institutions 5 --seeds 0 1 2 3 4
    .venv/bin/python benchmarks/digits_institutions.py --institutions 10

Writes benchmarks/results/digits_<n>_institutions.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medforge_merger.mixture import Mixture  # noqa: E402
from medforge_merger.tasks import Task  # noqa: E402
from medforge_trainer.__main__ import main as train_main  # noqa: E402
from tests.merge_experiment import (  # noqa: E402
    PUBLIC_LEARNING_RATE,
    Setup,
    all_images,
    heldout_scores,
    merge,
    scaled_factors,
    train_vision,
)
from tests.train_helpers import job_config, prepare, tiny_clip  # noqa: E402

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PAIRS = {
    5: [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)],
    10: [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (1, 7), (3, 8), (4, 9), (5, 6), (0, 6)],
}
PUBLIC, HELDOUT = 20, 30  # per class: the base's public part, and images nobody trains on


def strategies(seed: int) -> dict[str, dict[str, Any]]:
    search = {"seed": seed, "budget": 30}
    return {
        "task-arithmetic": {"type": "linear"},
        "ties": {"type": "ties", "density": 0.2},
        "dare-ties": {"type": "dare-ties", "density": 0.5, "search": {"seed": seed}},
        "fusion": {"type": "fusion", "search": search},
        "fusion-exact": {"type": "fusion-exact", "search": search},
        "mixture": {"type": "mixture", "search": search},
        "iso-c": {"type": "iso-c", "search": search},
        "iso-cts": {"type": "iso-cts", "search": search},
        "tsv": {"type": "tsv", "search": search},
        "knots-ties": {"type": "knots-ties", "density": 0.2, "search": search},
        "core-ties": {"type": "core-ties", "density": 0.2, "search": search},
    }


def write_images(folder: Path, images: np.ndarray, digits: list[int]) -> None:
    """The 8 x 8 scans as 32 x 32 RGB PNG files, one folder per class (its word)."""
    for digit in sorted(set(digits)):
        (folder / WORDS[digit]).mkdir(parents=True, exist_ok=True)
    for i, (img, digit) in enumerate(zip(images, digits, strict=True)):
        pixels = (img / 16.0 * 255).astype(np.uint8)
        Image.fromarray(pixels).resize((32, 32), Image.Resampling.BICUBIC).convert("RGB").save(
            folder / WORDS[digit] / f"{i}.png"
        )


def split(seed: int, pairs: list[tuple[int, int]]) -> dict[str, Any]:
    """Disjoint images per class for the public part, the held-out sets and each hospital."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    users: dict[int, list[int]] = {c: [h for h, p in enumerate(pairs) if c in p] for c in range(10)}
    public: list[int] = []
    heldout: dict[int, list[int]] = {}
    hospital: dict[int, dict[int, list[int]]] = {h: {} for h in range(len(pairs))}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(d.target == c)).tolist()
        public += idx[:PUBLIC]
        heldout[c] = idx[PUBLIC : PUBLIC + HELDOUT]
        rest = idx[PUBLIC + HELDOUT :]
        share = len(rest) // max(len(users[c]), 1)
        for j, h in enumerate(users[c]):
            hospital[h][c] = rest[j * share : (j + 1) * share]
    return {
        "images": d.images,
        "target": d.target,
        "public": public,
        "heldout": heldout,
        "hospital": hospital,
    }


def pretrain_on_public(base: Path, root: Path, data: dict[str, Any], seed: int) -> None:
    """One epoch of the vision tower on the public part, all ten digits (CLIP prompts)."""
    from medforge_trainer import model

    folder = root / "public"
    write_images(folder, data["images"][data["public"]], data["target"][data["public"]].tolist())
    clip, tokenizer, _ = model.load_base(base)
    images, labels = all_images(base, folder, WORDS, validation=0.0)
    head = model.Classifier(clip, "clip-prompt", tuple(WORDS), tokenizer)
    train_vision(clip, [(head, images, labels)], seed, PUBLIC_LEARNING_RATE * 3, epochs=3)
    clip.save_pretrained(str(base))


def build(root: Path, seed: int, pairs: list[tuple[int, int]]) -> Setup:
    data = split(seed, pairs)
    base = tiny_clip(root / "clip", seed=seed)
    pretrain_on_public(base, root, data, seed)
    digest = prepare(base)
    adapters, heldout, names = [], [], []
    for h, pair in enumerate(pairs):
        name = f"{WORDS[pair[0]]}-{WORDS[pair[1]]}"
        classes = [WORDS[c] for c in pair]
        idx = [i for c in pair for i in data["hospital"][h][c]]
        write_images(root / name / "data", data["images"][idx], data["target"][idx].tolist())
        cfg = job_config(
            base,
            digest,
            root / name / "data",
            classes,
            task={"name": name, "classes": classes},
            training={"seed": seed, "epochs": 4},
            distillation={"imagesPerClass": 10, "iterations": 300},
        )
        (root / name / "job.json").write_text(json.dumps(cfg))
        out = root / name / "adapter"
        args = [
            "--config",
            str(root / name / "job.json"),
            "--output-dir",
            str(out),
            "--termination-log",
            str(root / name / "term"),
        ]
        assert train_main(args) == 0, (root / name / "term").read_text()
        adapters.append(out)
        held = [i for c in pair for i in data["heldout"][c]]
        write_images(root / name / "heldout", data["images"][held], data["target"][held].tolist())
        images, labels = all_images(base, root / name / "heldout", classes, validation=0.5)
        heldout.append(Task(name, classes, "clip-prompt", images, labels))
        names.append(name)
    return Setup(base, digest, adapters, heldout, names)


def run_seed(root: Path, seed: int, pairs: list[tuple[int, int]]) -> dict[str, Any]:
    setup = build(root, seed, pairs)
    n = len(pairs)
    own = [heldout_scores(setup, scaled_factors(d))[i] for i, d in enumerate(setup.adapters)]
    out: dict[str, Any] = {"own-adapter": own, "base": heldout_scores(setup, {})}
    maps = [scaled_factors(d) for d in setup.adapters]
    out["uniform-mixture"] = heldout_scores(setup, Mixture(maps, [1 / n] * n, setup.names))
    seconds: dict[str, float] = {}
    for name, spec in strategies(seed).items():
        t0 = time.perf_counter()
        composite = merge(setup, root, spec, name)
        seconds[name] = round(time.perf_counter() - t0, 2)
        out[name] = heldout_scores(setup, composite)
    out["seconds"] = seconds
    return out


def summarise(runs: dict[str, Any]) -> dict[str, Any]:
    names = [k for k in next(iter(runs.values())) if k not in ("own-adapter", "seconds")]
    table = {}
    for name in names:
        ratios = [
            [a / o if o else 0.0 for a, o in zip(r[name], r["own-adapter"], strict=True)]
            for r in runs.values()
        ]
        flat = [x for row in ratios for x in row]
        table[name] = {
            "normalised_mean": round(sum(flat) / len(flat), 4),
            "normalised_min": round(min(flat), 4),
            "accuracy_mean": round(
                sum(sum(r[name]) / len(r[name]) for r in runs.values()) / len(runs), 4
            ),
            "merge_seconds": (
                round(sum(r["seconds"][name] for r in runs.values()) / len(runs), 2)
                if name in next(iter(runs.values()))["seconds"]
                else None
            ),
        }
    own = [x for r in runs.values() for x in r["own-adapter"]]
    return {
        "own_adapter_accuracy_mean": round(sum(own) / len(own), 4),
        "strategies": dict(sorted(table.items(), key=lambda kv: -kv[1]["normalised_mean"])),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--institutions", type=int, choices=sorted(PAIRS), default=5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = p.parse_args()
    pairs = PAIRS[args.institutions]
    runs: dict[str, Any] = {}
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as d, contextlib.redirect_stdout(io.StringIO()):
            runs[str(seed)] = run_seed(Path(d), seed, pairs)
        print(
            seed,
            json.dumps(
                {k: round(sum(v) / len(v), 3) for k, v in runs[str(seed)].items() if k != "seconds"}
            ),
            flush=True,
        )
    result = {
        "institutions": args.institutions,
        "tasks": [f"{WORDS[a]}-{WORDS[b]}" for a, b in pairs],
        "seeds": args.seeds,
        **summarise(runs),
        "runs": runs,
        "date": time.strftime("%Y-%m-%d"),
    }
    out = ROOT / "benchmarks" / "results" / f"digits_{args.institutions}_institutions.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
