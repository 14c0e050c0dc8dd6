"""Merge quality on real images that ship inside PyPI packages, every strategy side by side.

Two setups, each on a small CLIP (4-layer, 64-wide vision tower, 4 px patches) first trained
on a public part disjoint from every hospital's images, so that the adapters are small updates
of a useful base, as in the MedForge paper:

- digits: scikit-learn's 1,797 handwritten digit scans. Each hospital learns a two-digit task
  on its own scans, seen through its own scanner: a fixed rotation, tint, noise level and for
  some a reversed contrast (site effects; the base saw clean public scans only). Five and ten
  hospitals (the ten share digits between tasks).
- tissue: scikit-image's immunohistochemistry slide and retinal fundus photograph cut into
  32 px patches. Three hospitals: DAB-stained versus unstained tissue and nucleus-rich versus
  nucleus-poor tissue on the same slide (the same images, labels that cut across each other),
  and vessel versus background on the retina. Labels come from the stain separation
  (skimage.color.rgb2hed) and a vesselness filter (skimage.filters.sato): the top and bottom
  35 % of patches by stained, nuclear or vessel area (the ambiguous middle is left out); the
  public part, the held-out part and each hospital's part are disjoint regions of the images.

For every strategy: accuracy on each hospital's held-out images divided by that hospital's own
adapter's accuracy on them (normalised accuracy, as the merging literature reports it), its
mean and minimum over tasks and seeds, with merge seconds and the merge's peak memory. Task
arithmetic is reported twice: at weight 1 and at its best scale (chosen per seed on a
validation half of the held-out images, an advantage no other strategy gets; the rest are
scored on the other half only).

    .venv/bin/python benchmarks/real_images.py --data digits --institutions 5
    .venv/bin/python benchmarks/real_images.py --data digits --institutions 10
    .venv/bin/python benchmarks/real_images.py --data tissue
    .venv/bin/python benchmarks/real_images.py --data generated   (the three generated tasks)

Writes benchmarks/results/real_images_<data>_<n>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.child_peak import peak_mib, run_module_script  # noqa: E402
from medforge_merger.mixture import Mixture  # noqa: E402
from medforge_merger.tasks import Task  # noqa: E402
from medforge_ml.synthetic import tiny_clip  # noqa: E402
from medforge_trainer.__main__ import main as train_main  # noqa: E402
from tests.merge_experiment import (  # noqa: E402
    PUBLIC_LEARNING_RATE,
    Setup,
    all_images,
    heldout_scores,
    job_args,
    merge_config,
    read_factors,
    scaled_factors,
    train_vision,
)
from tests.train_helpers import job_config, prepare  # noqa: E402

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PAIRS = {
    5: [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)],
    10: [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (1, 7), (3, 8), (4, 9), (5, 6), (0, 6)],
}
PUBLIC, HELDOUT = 20, 30  # digits per class: the base's public part, and images nobody trains on
MODEL = {"width": 64, "layers": 4, "patch": 4}
LORA = {
    "rank": 8,
    "alpha": 16,
    "dropout": 0.0,
    "targetModules": ["q_proj", "k_proj", "v_proj", "out_proj"],
}
TRAINING = {"epochs": 10, "batchSize": 16, "learningRate": 0.003}
SCALES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]  # task arithmetic's candidates


@dataclass(frozen=True)
class Hospital:
    name: str
    classes: list[str]
    train: dict[str, list[np.ndarray]]  # class -> RGB images (uint8, 32 x 32 x 3)
    heldout: dict[str, list[np.ndarray]]


@dataclass(frozen=True)
class Data:
    public: dict[str, list[np.ndarray]]  # the base's pretraining images, every class
    hospitals: list[Hospital]


# --- digits ---------------------------------------------------------------------------------


def scanner(h: int) -> dict[str, Any]:
    """Hospital h's site effect: fixed for the hospital, the same on its held-out scans."""
    tints = [(1.0, 0.75, 0.75), (0.75, 1.0, 0.8), (0.8, 0.8, 1.0), (1.0, 1.0, 0.6), (0.7, 0.9, 1.0)]
    return {
        "angle": [-30, 20, 35, -15, 10, -35, 25, -20, 30, 15][h % 10],
        "invert": h % 3 == 1,
        "noise": 12.0 + 8.0 * (h % 4),
        "tint": tints[h % len(tints)],
    }


def scan(img: np.ndarray, site: dict[str, Any] | None, rng: np.random.Generator) -> np.ndarray:
    """An 8 x 8 digit (0-16) as a 32 x 32 RGB image through a site's scanner (None: clean)."""
    pixels = Image.fromarray((img / 16.0 * 255).astype(np.uint8))
    pixels = pixels.resize((32, 32), Image.Resampling.BICUBIC)
    if site is None:
        return np.asarray(pixels.convert("RGB"))
    pixels = pixels.rotate(site["angle"], resample=Image.Resampling.BILINEAR)
    x = np.asarray(pixels, dtype=np.float64)
    if site["invert"]:
        x = 255.0 - x
    x = x + rng.normal(0.0, site["noise"], x.shape)
    rgb = np.stack([x * t for t in site["tint"]], axis=-1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def digits(seed: int, institutions: int) -> Data:
    """Disjoint scans per class for the public part, the held-out sets and each hospital."""
    from sklearn.datasets import load_digits

    pairs = PAIRS[institutions]
    d = load_digits()
    rng = np.random.default_rng(seed)
    users = {c: [h for h, p in enumerate(pairs) if c in p] for c in range(10)}
    public: dict[str, list[np.ndarray]] = {w: [] for w in WORDS}
    heldout: dict[int, list[int]] = {}
    own: dict[int, dict[int, list[int]]] = {h: {} for h in range(len(pairs))}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(d.target == c)).tolist()
        public[WORDS[c]] = [scan(d.images[i], None, rng) for i in idx[:PUBLIC]]
        heldout[c] = idx[PUBLIC : PUBLIC + HELDOUT]
        rest = idx[PUBLIC + HELDOUT :]
        share = len(rest) // max(len(users[c]), 1)
        for j, h in enumerate(users[c]):
            own[h][c] = rest[j * share : (j + 1) * share]
    hospitals = []
    for h, pair in enumerate(pairs):
        site = scanner(h)
        hospitals.append(
            Hospital(
                f"{WORDS[pair[0]]}-{WORDS[pair[1]]}",
                [WORDS[c] for c in pair],
                {WORDS[c]: [scan(d.images[i], site, rng) for i in own[h][c]] for c in pair},
                {WORDS[c]: [scan(d.images[i], site, rng) for i in heldout[c]] for c in pair},
            )
        )
    return Data(public, hospitals)


# --- tissue ---------------------------------------------------------------------------------

PATCH, STRIDE = 32, 8


def patches(
    image: np.ndarray, score: np.ndarray, mask: np.ndarray, x0: int, x1: int
) -> list[tuple[np.ndarray, float]]:
    """Every 32 px patch (stride 8) lying wholly within columns [x0, x1) and the mask, with the
    mean of `score` over it."""
    out = []
    h, _ = score.shape
    for y in range(0, h - PATCH + 1, STRIDE):
        for x in range(x0, x1 - PATCH + 1, STRIDE):
            if mask[y : y + PATCH, x : x + PATCH].all():
                out.append(
                    (
                        image[y : y + PATCH, x : x + PATCH],
                        float(score[y : y + PATCH, x : x + PATCH].mean()),
                    )
                )
    return out


def labelled(
    found: list[tuple[np.ndarray, float]],
    bounds: tuple[float, float],
    classes: list[str],
    per_class: int,
    rng: np.random.Generator,
) -> dict[str, list[np.ndarray]]:
    """Patches scoring above bounds[1] are classes[0], below bounds[0] classes[1]; those in
    between (ambiguous) are left out; at most per_class of each, drawn at random."""
    out: dict[str, list[np.ndarray]] = {c: [] for c in classes}
    for img, s in found:
        if s > bounds[1]:
            out[classes[0]].append(img)
        elif s < bounds[0]:
            out[classes[1]].append(img)
    for c in classes:
        order = rng.permutation(len(out[c]))[:per_class]
        out[c] = [out[c][i] for i in order]
    return out


def tissue(seed: int) -> Data:
    from skimage import color, data, filters, transform

    rng = np.random.default_rng(seed)
    ihc = data.immunohistochemistry()
    hed = color.rgb2hed(ihc)
    dab = (hed[..., 2] > filters.threshold_otsu(hed[..., 2])).astype(float)
    nuclei = (hed[..., 0] > filters.threshold_otsu(hed[..., 0])).astype(float)
    retina = (transform.resize(data.retina(), (704, 704), anti_aliasing=True) * 255).astype(
        np.uint8
    )
    green = retina[..., 1].astype(float) / 255
    fundus = color.rgb2gray(retina) > 0.12
    vessel_response = filters.sato(green, sigmas=[1, 2], black_ridges=True)
    vessels = (vessel_response > filters.threshold_otsu(vessel_response[fundus])).astype(float)
    full = np.ones(ihc.shape[:2], bool)
    # Columns: the public part, the held-out part, then each hospital's own region.
    tasks = [
        ("ihc-stain", ["stained", "unstained"], ihc, dab, full, (208, 360)),
        ("ihc-nuclei", ["nuclei", "stroma"], ihc, nuclei, full, (360, 512)),
        ("retina-vessel", ["vessel", "background"], retina, vessels, fundus, (352, 704)),
    ]
    regions = {"ihc": ((0, 96), (96, 208)), "retina": ((0, 160), (160, 352))}
    public: dict[str, list[np.ndarray]] = {}
    hospitals = []
    for name, classes, image, score, mask, own in tasks:
        pub, held = regions[name.split("-")[0]]
        everywhere = [s for _, s in patches(image, score, mask, 0, image.shape[1])]
        # The top and bottom 35 % of all patches: the middle third is ambiguous and left out.
        bounds = (float(np.quantile(everywhere, 0.35)), float(np.quantile(everywhere, 0.65)))
        public |= labelled(patches(image, score, mask, *pub), bounds, classes, 40, rng)
        hospitals.append(
            Hospital(
                name,
                classes,
                labelled(patches(image, score, mask, *own), bounds, classes, 150, rng),
                labelled(patches(image, score, mask, *held), bounds, classes, 40, rng),
            )
        )
    return Data(public, hospitals)


# --- generated ------------------------------------------------------------------------------


def generated(seed: int) -> Data:
    """The generated three-institution tasks of tests/merge_experiment.py (their images, noise
    50) on this benchmark's pipeline: the pretrained base, the adapters and the scoring above."""
    import torch

    from medforge_ml.synthetic import make_image
    from tests.merge_experiment import INSTITUTIONS, PUBLIC_PER_CLASS

    def images(
        classes: list[str], n: int, gen_seed: int, style: int
    ) -> dict[str, list[np.ndarray]]:
        gen = torch.Generator().manual_seed(gen_seed)
        return {
            c: [make_image(label, 32, gen, style, 50.0).permute(1, 2, 0).numpy() for _ in range(n)]
            for label, c in enumerate(classes)
        }

    public: dict[str, list[np.ndarray]] = {}
    hospitals = []
    for i, (task, classes, style) in enumerate(INSTITUTIONS):
        public |= images(classes, PUBLIC_PER_CLASS, 7000 + 100 * seed + i, style)
        hospitals.append(
            Hospital(
                task,
                classes,
                images(classes, 40, 100 * seed + i, style),
                images(classes, 30, 100 * seed + 50 + i, style),
            )
        )
    return Data(public, hospitals)


# --- the experiment -------------------------------------------------------------------------


def write(folder: Path, images: dict[str, list[np.ndarray]]) -> Path:
    for cls, imgs in images.items():
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(imgs):
            Image.fromarray(img).save(folder / cls / f"{i}.png")
    return folder


def build(root: Path, seed: int, data: Data) -> tuple[Setup, list[Task]]:
    """The base (pretrained on the public part), each hospital's adapter and distilled set,
    and the held-out tasks split into (scored, validation) halves."""
    from medforge_trainer import model

    base = tiny_clip(root / "clip", seed=seed, **MODEL)
    classes = sorted(data.public)
    clip, tokenizer, _ = model.load_base(base)
    images, labels = all_images(base, write(root / "public", data.public), classes, 0.0)
    head = model.Classifier(clip, "clip-prompt", tuple(classes), tokenizer)
    train_vision(clip, [(head, images, labels)], seed, PUBLIC_LEARNING_RATE * 3, epochs=3)
    clip.save_pretrained(str(base))
    digest = prepare(base)
    adapters, scored, validation = [], [], []
    for h in data.hospitals:
        cfg = job_config(
            base,
            digest,
            write(root / h.name / "data", h.train),
            h.classes,
            task={"name": h.name, "classes": h.classes},
            lora=LORA,
            training={**TRAINING, "seed": seed},
            distillation={"imagesPerClass": 10, "iterations": 300},
        )
        (root / h.name / "job.json").write_text(json.dumps(cfg))
        out = root / h.name / "adapter"
        args = ["--config", str(root / h.name / "job.json"), "--output-dir", str(out)]
        args += ["--termination-log", str(root / h.name / "term")]
        assert train_main(args) == 0, (root / h.name / "term").read_text()
        adapters.append(out)
        images, labels = all_images(
            base, write(root / h.name / "heldout", h.heldout), h.classes, 0.5
        )
        order = np.random.default_rng(seed).permutation(len(labels))
        half = len(order) // 2
        for part, idx in ((scored, order[:half]), (validation, order[half:])):
            part.append(Task(h.name, h.classes, "clip-prompt", images[idx], labels[idx]))
    names = [h.name for h in data.hospitals]
    return Setup(base, digest, adapters, scored, names), validation


def strategies(seed: int) -> dict[str, dict[str, Any]]:
    search = {"seed": seed, "budget": 30}
    return {
        "task-arithmetic": {"type": "linear"},
        "ties": {"type": "ties", "density": 0.2},
        "dare": {"type": "dare-linear", "density": 0.5, "search": {"seed": seed}},
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


def merge_process(setup: Setup, root: Path, spec: dict[str, Any], name: str) -> tuple[Path, float]:
    """`medforge-merge` in a process of its own, as in its Job: (the composite, its peak RSS in
    MiB, read from the child's own VmHWM)."""
    config = merge_config(setup, root, spec, name)
    peak = root / f"{name}.peak"
    script = run_module_script(peak, "medforge_merger", "medforge-merge")
    proc = subprocess.run(
        [sys.executable, "-c", script, *job_args(root, name, config)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError((root / f"{name}.term").read_text() + proc.stderr[-2000:])
    return root / name, peak_mib(peak)


def run_seed(root: Path, seed: int, data: Data) -> dict[str, Any]:
    setup, validation = build(root, seed, data)
    n = len(setup.adapters)
    own = [heldout_scores(setup, scaled_factors(d))[i] for i, d in enumerate(setup.adapters)]
    out: dict[str, Any] = {"own-adapter": own, "base": heldout_scores(setup, {})}
    maps = [scaled_factors(d) for d in setup.adapters]
    out["uniform-mixture"] = heldout_scores(setup, Mixture(maps, [1 / n] * n, setup.names))
    seconds: dict[str, float] = {}
    peaks: dict[str, float] = {}
    for name, spec in strategies(seed).items():
        t0 = time.perf_counter()
        composite, peak = merge_process(setup, root, spec, name)
        seconds[name] = round(time.perf_counter() - t0, 2)
        peaks[name] = round(peak, 1)
        out[name] = heldout_scores(setup, composite)
        if name == "task-arithmetic":
            # Its best scale, chosen on the validation halves (mean accuracy over tasks).
            checked = replace(setup, heldout=validation)
            path = composite / "adapter.safetensors"
            best = max(SCALES, key=lambda s: sum(heldout_scores(checked, read_factors(path, s))))
            out["task-arithmetic-best-scale"] = heldout_scores(setup, read_factors(path, best))
            out["best-scale"] = best
    out["seconds"] = seconds
    out["peak_rss_mib"] = peaks
    return out


NOT_STRATEGIES = ("own-adapter", "seconds", "peak_rss_mib", "best-scale")


def summarise(runs: dict[str, Any]) -> dict[str, Any]:
    first = next(iter(runs.values()))
    names = [k for k in first if k not in NOT_STRATEGIES]
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
            "seed_means": [round(sum(row) / len(row), 4) for row in ratios],
            "accuracy_mean": round(
                sum(sum(r[name]) / len(r[name]) for r in runs.values()) / len(runs), 4
            ),
            "merge_seconds": (
                round(sum(r["seconds"][name] for r in runs.values()) / len(runs), 2)
                if name in first["seconds"]
                else None
            ),
            "merge_peak_rss_mib": (
                max(r["peak_rss_mib"][name] for r in runs.values())
                if name in first["peak_rss_mib"]
                else None
            ),
        }
    own = [x for r in runs.values() for x in r["own-adapter"]]
    return {
        "own_adapter_accuracy_mean": round(sum(own) / len(own), 4),
        "strategies": dict(sorted(table.items(), key=lambda kv: -kv[1]["normalised_mean"])),
    }


def load_data(kind: str, seed: int, institutions: int) -> Data:
    if kind == "digits":
        return digits(seed, institutions)
    return tissue(seed) if kind == "tissue" else generated(seed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=["digits", "tissue", "generated"], default="digits")
    p.add_argument("--institutions", type=int, choices=sorted(PAIRS), default=5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = p.parse_args()
    runs: dict[str, Any] = {}
    for seed in args.seeds:
        data = load_data(args.data, seed, args.institutions)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as d, contextlib.redirect_stdout(io.StringIO()):
            runs[str(seed)] = run_seed(Path(d), seed, data)
        summary = {
            k: round(sum(v) / len(v), 3)
            for k, v in runs[str(seed)].items()
            if k not in NOT_STRATEGIES[1:]
        }
        print(seed, f"{time.perf_counter() - t0:.0f} s", json.dumps(summary), flush=True)
    n = len(next(iter(runs.values()))["own-adapter"])
    result = {
        "data": args.data,
        "institutions": n,
        "model": MODEL,
        "lora": LORA,
        "training": TRAINING,
        "seeds": args.seeds,
        **summarise(runs),
        "runs": runs,
        "date": time.strftime("%Y-%m-%d"),
    }
    out = ROOT / "benchmarks" / "results" / f"real_images_{args.data}_{n}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
