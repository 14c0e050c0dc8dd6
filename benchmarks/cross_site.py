"""The value of joining: one task at many sites, each site seeing its images through its own
scanner, and two more sites nobody trains on. Is the shared model better than a hospital's own
on patients from scanners and sites it does not have?

Same small CLIP (4-layer, 64-wide vision tower, 4 px patches, pretrained on a clean public part)
and LoRA as benchmarks/real_images.py; every model here is trained by medforge-train and every
composite merged by medforge-merge, as in their Jobs:

- tissue (real images): scikit-image's IHC slide, stained versus unstained 32 px patches; the
  slide cut into 128 px blocks dealt to the public part and to the sites (two blocks each, one
  from either end of the stain ranking), every site's patches through its own scanner
  (rotation, tint, contrast, inversion for some, noise); 5 sites.
- generated: the three-class generated task of tests/merge_experiment.py (colour and a bright
  square are the cues) through the same scanners, without rotation; 5 and 10 sites.
- digits (all ten, scikit-learn's scans through each site's scanner, `--data digits`): on this
  small CLIP even centralised training stays at chance (0.10 measured, at 6 and 12 epochs), so
  it is not in the default run.

Rows, at equal local work (every site trains rounds x epochs epochs in all) and equal images
seen:

- own adapter: each site's adapter alone (mean, best and worst site on the unseen sites);
- every composite strategy one-shot: the sites' adapters merged once;
- medforge-branch: spec.startFrom latest over R rounds, sites arriving in turn, each trained
  from the latest revision and merged relative to it (stale 0); medforge-branch-async: each
  site trains from the revision before the latest (one arrival in flight: stale 1);
- fedavg and fedprox: Flower's FedAvg and FedProx strategies (the real flwr library's
  aggregate_fit, driving the same rounds here; its simulation runtime needs Ray, which this
  benchmark does not install): each round every site trains a fresh LoRA on the global model
  (medforge-train with startFrom: the global folded in), the strategy averages the updates
  weighted by images, the average is folded into the global; FedProx's proximal_mu goes to the
  trainer as training.proximalMu;
- centralised: one LoRA trained on all sites' pooled images (the images leave the sites).

Figures: accuracy on the unseen sites, normalised by centralised; accuracy on each site's own
held-out images; bytes that left the sites; wall time; over seeds, mean and spread.

    .venv/bin/python benchmarks/cross_site.py --quick   (tissue and generated at 5 sites, seed 0)
    .venv/bin/python benchmarks/cross_site.py           (tissue 5, generated 5 and 10; 5 seeds)

Writes benchmarks/results/cross_site_<data>_<sites>.json (and _quick for --quick).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.real_images import (  # noqa: E402
    LORA,
    MODEL,
    WORDS,
    labelled,
    merge_process,
    patches,
    scan,
    scanner,
    strategies,
    write,
)
from medforge_common.artifacts import ADAPTER_FILE, MIXTURE_FILE  # noqa: E402
from medforge_common.manifest import Manifest  # noqa: E402
from medforge_merger.__main__ import main as merge_main  # noqa: E402
from medforge_merger.evaluate import Evaluator  # noqa: E402
from medforge_merger.mixture import Mixture  # noqa: E402
from medforge_merger.tasks import Task  # noqa: E402
from medforge_ml.composite import file_deltas  # noqa: E402
from medforge_ml.synthetic import tiny_clip  # noqa: E402
from medforge_trainer.__main__ import main as train_main  # noqa: E402
from tests.merge_experiment import (  # noqa: E402
    PUBLIC_LEARNING_RATE,
    Setup,
    all_images,
    train_vision,
)
from tests.train_helpers import job_config, prepare  # noqa: E402

Images = dict[str, list[np.ndarray]]
EPOCHS, ROUNDS, LEARNING_RATE = 1, 10, 0.003  # per round; one-shot adapters train ROUNDS x EPOCHS
FEDPROX_MU = 0.1
UNSEEN = 2  # sites nobody trains on
DIGITS = tuple(range(10))
COMPOSITE = "bench/cross-site"


@dataclass(frozen=True)
class Site:
    name: str
    train: Images
    test: Images  # the site's own held-out images


@dataclass(frozen=True)
class Data:
    classes: list[str]
    public: Images
    sites: list[Site]
    unseen: list[Site]  # test images only


# --- data -----------------------------------------------------------------------------------


def digits(seed: int, n: int, labels: tuple[int, ...] = DIGITS) -> Data:
    """One digit task at every site; disjoint scans per site, through the site's scanner."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    words = [WORDS[c] for c in labels]
    public: Images = {w: [] for w in words}
    parts: list[dict[str, list[int]]] = [{} for _ in range(n + UNSEEN)]
    for c in labels:
        idx = rng.permutation(np.flatnonzero(d.target == c)).tolist()
        public[WORDS[c]] = [scan(d.images[i], None, rng) for i in idx[:20]]
        rest = idx[20:]
        share = len(rest) // (n + UNSEEN)
        for s in range(n + UNSEEN):
            parts[s][WORDS[c]] = rest[s * share : (s + 1) * share]
    sites = []
    for s, part in enumerate(parts):
        site = scanner(s + 3 * seed)  # the seeds see other scanner pairings too
        imgs = {w: [scan(d.images[i], site, rng) for i in ix] for w, ix in part.items()}
        cut = {w: max(2, len(v) // 5) for w, v in imgs.items()}  # a fifth held out at home
        sites.append(
            Site(
                f"site-{s}",
                {w: v[cut[w] :] for w, v in imgs.items()},
                {w: v[: cut[w]] for w, v in imgs.items()},
            )
        )
    return Data(words, public, sites[:n], sites[n:])


def tissue_scanner(s: int) -> dict[str, Any]:
    """Site s's scanner for the tissue and generated images: a strong tint, contrast (negative:
    inverted), noise and, for tissue, a rotation; fixed for the site."""
    tints = [(1.0, 0.55, 0.55), (0.55, 1.0, 0.6), (0.6, 0.6, 1.0), (1.0, 1.0, 0.45),
             (0.5, 0.85, 1.0), (0.9, 0.5, 0.9), (0.75, 0.75, 0.75)]  # fmt: skip
    return {
        "angle": [0, 90, 180, 270][s % 4],
        "tint": tints[s % len(tints)],
        "noise": 10.0 + 8.0 * (s % 4),
        "contrast": [1.0, 0.6, 1.4, -0.8, 0.8, 1.2, -1.0][s % 7],
    }


def through(img: np.ndarray, site: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    x = np.rot90(img.astype(np.float64), site["angle"] // 90)
    x = (x - 128.0) * site["contrast"] + 128.0 + rng.normal(0.0, site["noise"], x.shape)
    x = x * np.asarray(site["tint"])
    return np.clip(x, 0, 255).astype(np.uint8)


def tissue(seed: int, n: int) -> Data:
    """Stained versus unstained IHC patches. The slide is cut into 128 px blocks, dealt at
    random (seeded) to the public part and to n + 2 sites, two blocks each; a site's patches
    (overlapping within its own blocks only) go through its scanner."""
    from skimage import color, data, filters

    rng = np.random.default_rng(seed)
    ihc = data.immunohistochemistry()
    hed = color.rgb2hed(ihc)
    dab = (hed[..., 2] > filters.threshold_otsu(hed[..., 2])).astype(float)
    classes = ["stained", "unstained"]
    everywhere = [s for _, s in patches(ihc, dab, np.ones(ihc.shape[:2], bool), 0, ihc.shape[1])]
    bounds = (float(np.quantile(everywhere, 0.35)), float(np.quantile(everywhere, 0.65)))
    blocks = [(y, x) for y in range(0, 512, 128) for x in range(0, 512, 128)]
    # Blocks ranked by how much of them is stained; each site gets one from either end, so
    # that every site sees both classes (in its own proportion).
    ranked = sorted(blocks, key=lambda b: float(dab[b[0] : b[0] + 128, b[1] : b[1] + 128].mean()))
    pairs = [(ranked[i], ranked[-1 - i]) for i in range(len(ranked) // 2)]
    order = [blk for i in rng.permutation(len(pairs)) for blk in pairs[i]]

    def found(mine: list[tuple[int, int]], per_class: int) -> Images:
        mask = np.zeros(ihc.shape[:2], bool)
        for y, x in mine:
            mask[y : y + 128, x : x + 128] = True
        return labelled(patches(ihc, dab, mask, 0, ihc.shape[1]), bounds, classes, per_class, rng)

    public = found(order[:2], 40)
    sites = []
    for s in range(n + UNSEEN):
        look = tissue_scanner(s + seed)
        got = found(order[2 + 2 * s : 4 + 2 * s], 120)
        imgs = {c: [through(i, look, rng) for i in v] for c, v in got.items()}
        cut = {c: max(2, len(v) // 5) for c, v in imgs.items()}
        sites.append(
            Site(
                f"site-{s}",
                {c: v[cut[c] :] for c, v in imgs.items()},
                {c: v[: cut[c]] for c, v in imgs.items()},
            )
        )
    return Data(classes, public, sites[:n], sites[n:])


def generated(seed: int, n: int) -> Data:
    """The generated three-class task (tests/merge_experiment.py's lung set: colour and a
    bright square are the cues), as many images as wanted; each site's scanner tints, scales
    the contrast and adds noise (no rotation: the square's position is a cue)."""
    import torch

    from medforge_ml.synthetic import make_image

    classes, style = ["adenocarcinoma", "benign tissue", "squamous"], 1
    rng = np.random.default_rng(seed)

    def images(count: int, gen_seed: int, look: dict[str, Any] | None) -> Images:
        gen = torch.Generator().manual_seed(gen_seed)
        out: Images = {}
        for label, c in enumerate(classes):
            raw = [make_image(label, 32, gen, style, 40.0).permute(1, 2, 0).numpy()
                   for _ in range(count)]  # fmt: skip
            out[c] = raw if look is None else [through(i, look, rng) for i in raw]
        return out

    sites = []
    for s in range(n + UNSEEN):
        look = tissue_scanner(s + seed) | {"angle": 0}
        train = images(60, 1000 * seed + 2 * s, look)
        test = images(15 if s < n else 40, 1000 * seed + 2 * s + 1, look)
        sites.append(Site(f"site-{s}", train, test))
    return Data(classes, images(4, 1000 * seed + 999, None), sites[:n], sites[n:])


# --- training and merging through the real tools --------------------------------------------


@dataclass
class Bench:
    root: Path
    base: Path
    digest: str
    data: Data
    seed: int
    unseen: list[Task]
    own_tests: list[Task]
    evaluator: Any = None

    def train(
        self, site: int | None, epochs: int, name: str, parent: Path | None = None, mu: float = 0.0,
        distil: bool = False,
    ) -> Path:  # fmt: skip
        """medforge-train on a site's images (None: all sites pooled), from `parent` (a
        revision folder) or the base; the adapter's folder."""
        folder = self.root / ("pooled" if site is None else self.data.sites[site].name) / "data"
        cfg = job_config(
            self.base,
            self.digest,
            folder,
            self.data.classes,
            task={"name": "cross-site", "classes": self.data.classes},
            lora=LORA,
            training={"epochs": epochs, "batchSize": 16, "learningRate": LEARNING_RATE,
                      "seed": self.seed, "proximalMu": mu},
            # Small distilled sets: the searched merges need one; ten classes cost ten times two.
            distillation={"imagesPerClass": 5, "iterations": 120} if distil else {},
            dataset={"uri": str(folder), "validationFraction": 0.1},
        )  # fmt: skip
        if parent is not None:
            revision = json.loads((parent / "manifest.json").read_text())["meta"]["revision"]
            cfg["startFrom"] = {"composite": COMPOSITE, "revision": revision,
                                "digest": Manifest.from_json((parent / "manifest.json").read_text()).digest(),
                                "path": str(parent)}  # fmt: skip
        job = self.root / "jobs" / name
        job.mkdir(parents=True)
        (job / "job.json").write_text(json.dumps(cfg))
        args = ["--config", str(job / "job.json"), "--output-dir", str(job / "out")]
        args += ["--termination-log", str(job / "term")]
        with contextlib.redirect_stdout(io.StringIO()):
            assert train_main(args) == 0, (job / "term").read_text()
        return job / "out"

    def merge(
        self, name: str, inputs: list[tuple[Path, Path | None]], current: Path | None
    ) -> Path:
        """medforge-merge (linear) of adapters, each with its parent revision number (0: from
        the base), into `current` (incremental) or afresh: the revision's folder."""
        items = []
        for i, (d, parent) in enumerate(inputs):
            m = Manifest.from_json((d / "manifest.json").read_text())
            item: dict[str, Any] = {
                "namespace": f"h{i}", "name": d.parent.name, "digest": m.digest(),
                "files": [{"name": f, "path": str(d / f)} for f in ["manifest.json", *(e.name for e in m.files)]],
            }  # fmt: skip
            if parent is not None:
                pm = parent / "manifest.json"
                number = self.revision_number(parent)
                stale = (self.revision_number(current) - number) if current else 0
                item["parent"] = {"revision": number, "digest": Manifest.from_json(pm.read_text()).digest(),
                                  "stale": stale}  # fmt: skip
            items.append(item)
        # Rank 64 is every adapted layer's full rank here: the re-compression loses nothing.
        cfg: dict[str, Any] = {"kind": "merge", "baseModel": {"digest": self.digest, "files": []},
                               "strategy": {"type": "linear"}, "inputs": items, "output": {},
                               "integration": "incremental" if current else "full",
                               "branches": {"rank": MODEL["width"]}}  # fmt: skip
        if current is not None:
            cm = Manifest.from_json((current / "manifest.json").read_text())
            cfg["current"] = {"revision": self.revision_number(current), "digest": cm.digest(),
                              "files": [{"name": f, "path": str(current / f)} for f in ("manifest.json", "adapter.safetensors")]}  # fmt: skip
        job = self.root / "merges" / name
        job.mkdir(parents=True)
        (job / "job.json").write_text(json.dumps(cfg))
        args = ["--config", str(job / "job.json"), "--output-dir", str(job / "out")]
        args += ["--termination-log", str(job / "term")]
        with contextlib.redirect_stdout(io.StringIO()):
            assert merge_main(args) == 0, (job / "term").read_text()
        return job / "out"

    def revision_number(self, folder: Path) -> int:
        return int(json.loads((folder / "manifest.json").read_text())["meta"].get("revision", 0))

    def keep(self, merged: Path, revision: int, tag: str) -> Path:
        """A merged folder as revision `revision` of the benchmark's composite (its manifest
        carries the number the trainer's startFrom names)."""
        return self.revision(f"{tag}-{revision}", revision, {}, merged)

    def revision(
        self, folder: str, number: int, deltas: dict[str, Any], source: Path | None = None
    ) -> Path:
        """A revision folder (dense updates and a composite manifest) the trainer can start
        from and the merger can merge into."""
        import torch
        from safetensors.torch import save_file

        d = self.root / "revisions" / folder
        d.mkdir(parents=True)
        if source is not None:
            (d / "adapter.safetensors").write_bytes((source / "adapter.safetensors").read_bytes())
        else:
            save_file({f"{m}.delta.weight": torch.as_tensor(v).float().contiguous()
                       for m, v in deltas.items()}, str(d / "adapter.safetensors"))  # fmt: skip
        manifest = Manifest("composite", self.digest, meta={"revision": number, "maxRank": 0})
        manifest.add_file(d / "adapter.safetensors")
        (d / "manifest.json").write_text(manifest.to_json())
        return d

    def scores(self, model: Path | dict[str, Any] | None) -> dict[str, list[float]]:
        """Accuracy on each unseen site and on each site's own held-out images, of a merged
        folder (a mixture's too) or dense updates (None: the base alone)."""
        if self.evaluator is None:
            self.evaluator = Evaluator(self.base)
        ev = self.evaluator
        if isinstance(model, Path) and (model / MIXTURE_FILE).is_file():
            mix = Mixture.load(model / MIXTURE_FILE)
            predict: Callable[[Task], Any] = lambda t: mix.probabilities(ev, t)  # noqa: E731
        else:
            deltas = file_deltas(model / ADAPTER_FILE) if isinstance(model, Path) else model or {}
            predict = lambda t: ev.logits(t, deltas)  # noqa: E731

        def accuracy(tasks: list[Task]) -> list[float]:
            return [float((predict(t).argmax(1) == t.labels).double().mean()) for t in tasks]

        return {"unseen": accuracy(self.unseen), "own": accuracy(self.own_tests)}


def sent(folder: Path) -> int:
    """Bytes a contribution uploads: every file of its output (adapter, manifest, file
    fingerprints, a distilled set when there is one)."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def prepare_bench(root: Path, seed: int, data: Data) -> Bench:
    """The base pretrained on the public part; the sites' images on disk; the scored sets."""
    from medforge_trainer import model

    base = tiny_clip(root / "clip", seed=seed, **MODEL)
    clip, tokenizer, _ = model.load_base(base)
    images, labels = all_images(base, write(root / "public", data.public), data.classes, 0.0)
    head = model.Classifier(clip, "clip-prompt", tuple(data.classes), tokenizer)
    train_vision(clip, [(head, images, labels)], seed, PUBLIC_LEARNING_RATE * 3, epochs=3)
    clip.save_pretrained(str(base))
    digest = prepare(base)
    for s in data.sites:
        write(root / s.name / "data", s.train)
        write(root / "pooled" / "data", {c: [] for c in data.classes})
        for c, imgs in s.train.items():  # pooled: every site's images, renamed
            for i, img in enumerate(imgs):
                write_one(root / "pooled" / "data" / c / f"{s.name}-{i}.png", img)

    def tasks(sites: list[Site]) -> list[Task]:
        out = []
        for s in sites:
            x, y = all_images(base, write(root / "test" / s.name, s.test), data.classes, 0.5)
            out.append(Task(s.name, data.classes, "clip-prompt", x, y))
        return out

    return Bench(root, base, digest, data, seed, tasks(data.unseen), tasks(data.sites))


def write_one(path: Path, img: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(img).save(path)


# --- the modes ------------------------------------------------------------------------------

Row = dict[str, Any]


def timed(fn: Callable[[], tuple[Any, int]]) -> tuple[Any, int, float]:
    t0 = time.perf_counter()
    out, nbytes = fn()
    return out, nbytes, round(time.perf_counter() - t0, 2)


def own_and_one_shot(b: Bench, quick: bool) -> dict[str, Row]:
    """Each site's adapter (all its epochs at once, with a distilled set for the searched
    merges), alone and merged by every strategy."""
    t0 = time.perf_counter()
    adapters = [
        b.train(s, ROUNDS * EPOCHS, f"own-{s}", distil=True) for s in range(len(b.data.sites))
    ]
    train_seconds = time.perf_counter() - t0
    uploads = sum(sent(a) for a in adapters)
    per_site = [b.scores(file_deltas_scaled(a)) for a in adapters]
    rows: dict[str, Row] = {"own-adapter": {
        "unseen": [statistics.mean(p["unseen"]) for p in per_site],  # one figure per site
        "own": [p["own"][i] for i, p in enumerate(per_site)],
        "bytes": uploads, "seconds": round(train_seconds / len(adapters), 2)}}  # fmt: skip
    setup = Setup(b.base, b.digest, adapters, b.unseen, [f"site-{i}" for i in range(len(adapters))])
    chosen = strategies(b.seed)
    if quick:
        chosen = {
            k: v
            for k, v in chosen.items()
            if k in ("task-arithmetic", "ties", "fusion", "mixture", "tsv")
        }
    for name, spec in chosen.items():
        t1 = time.perf_counter()
        composite, _ = merge_process(setup, b.root, spec, f"one-shot-{name}")
        seconds = time.perf_counter() - t1
        rows[f"one-shot {name}"] = b.scores(composite) | {
            "bytes": uploads, "seconds": round(train_seconds + seconds, 2)}  # fmt: skip
    return rows


def branch(b: Bench, lag: int, tag: str) -> Row:
    """spec.startFrom over the rounds: each site in turn trains from the revision `lag`
    arrivals before the latest (0: the latest) and is merged relative to it."""
    t0 = time.perf_counter()
    n, nbytes = len(b.data.sites), 0
    first = b.train(0, EPOCHS, f"{tag}-r0-s0")
    nbytes += sent(first)
    latest = b.keep(b.merge(f"{tag}-1", [(first, None)], None), 1, tag)
    revisions = [latest]
    for k in range(1, ROUNDS * n):
        parent = revisions[max(0, len(revisions) - 1 - lag)]
        ad = b.train(k % n, EPOCHS, f"{tag}-r{k // n}-s{k % n}", parent=parent)
        nbytes += sent(ad)
        latest = b.keep(b.merge(f"{tag}-{k + 1}", [(ad, parent)], latest), k + 1, tag)
        revisions.append(latest)
    return b.scores(latest) | {"bytes": nbytes, "seconds": round(time.perf_counter() - t0, 2)}


def federated(b: Bench, mu: float, tag: str) -> Row:
    """FedAvg (mu 0) or FedProx through Flower's strategies: every round each site trains a
    fresh LoRA on the global model, the strategy averages the updates (weighted by images),
    and the average is folded into the global model."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedAvg, FedProx

    strategy = FedProx(proximal_mu=mu) if mu > 0 else FedAvg()
    t0 = time.perf_counter()
    n, nbytes = len(b.data.sites), 0
    global_: dict[str, np.ndarray] = {}
    current: Path | None = None
    for rnd in range(1, ROUNDS + 1):
        results = []
        for s in range(n):
            ad = b.train(s, EPOCHS, f"{tag}-r{rnd}-s{s}", parent=current,
                         mu=float(getattr(strategy, "proximal_mu", 0.0)))  # fmt: skip
            nbytes += sent(ad)
            update = {m: v.numpy() for m, v in file_deltas_scaled(ad).items()}
            keys = sorted(update)
            images = sum(len(v) for v in b.data.sites[s].train.values())
            fit = FitRes(
                Status(Code.OK, ""), ndarrays_to_parameters([update[k] for k in keys]), images, {}
            )
            results.append((None, fit))
        params, _ = strategy.aggregate_fit(rnd, results, [])  # type: ignore[arg-type]
        assert params is not None
        averaged = dict(zip(keys, parameters_to_ndarrays(params), strict=True))
        global_ = {k: global_.get(k, 0.0) + v for k, v in averaged.items()}
        current = b.revision(f"{tag}-{rnd}", rnd, global_)
    assert current is not None
    return b.scores(current) | {"bytes": nbytes, "seconds": round(time.perf_counter() - t0, 2)}


def file_deltas_scaled(adapter: Path) -> dict[str, Any]:
    """A contribution's dense update, its alpha / rank folded in."""
    meta = Manifest.from_json((adapter / "manifest.json").read_text()).meta
    scale = float(meta["alpha"]) / float(meta["rank"])
    return {m: scale * v for m, v in file_deltas(adapter / "adapter.safetensors").items()}


def centralised(b: Bench) -> Row:
    t0 = time.perf_counter()
    ad = b.train(None, ROUNDS * EPOCHS, "centralised")
    pooled = sum(p.stat().st_size for p in (b.root / "pooled" / "data").rglob("*.png"))
    return b.scores(file_deltas_scaled(ad)) | {
        "bytes": pooled,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def run_seed(root: Path, seed: int, data: Data, quick: bool) -> dict[str, Row]:
    t0 = time.perf_counter()
    b = prepare_bench(root, seed, data)
    rows = {"base": b.scores(None) | {"bytes": 0, "seconds": 0.0}}
    modes: list[tuple[str, Callable[[], dict[str, Row]]]] = [
        ("centralised", lambda: {"centralised": centralised(b)}),
        ("own and one-shot", lambda: own_and_one_shot(b, quick)),
        ("medforge-branch", lambda: {"medforge-branch": branch(b, 0, "branch")}),
        ("medforge-branch-async", lambda: {"medforge-branch-async": branch(b, 1, "async")}),
        ("fedavg", lambda: {"fedavg": federated(b, 0.0, "fedavg")}),
        ("fedprox", lambda: {"fedprox": federated(b, FEDPROX_MU, "fedprox")}),
    ]
    print(f"  prepared in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    for name, fn in modes:
        t1 = time.perf_counter()
        rows |= fn()
        print(f"  {name}: {time.perf_counter() - t1:.0f} s", file=sys.stderr, flush=True)
    return rows


# --- summary --------------------------------------------------------------------------------


def spread(xs: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.mean(xs), 4),
            "std": round(statistics.stdev(xs), 4) if len(xs) > 1 else 0.0,
            "min": round(min(xs), 4), "max": round(max(xs), 4)}  # fmt: skip


def summarise(runs: dict[str, dict[str, Row]]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    names = list(next(iter(runs.values())))
    for name in names:
        unseen = [statistics.mean(r[name]["unseen"]) for r in runs.values()]
        central = [statistics.mean(r["centralised"]["unseen"]) for r in runs.values()]
        table[name] = {
            "unseen_vs_centralised": spread([u / c for u, c in zip(unseen, central, strict=True)]),
            "unseen_accuracy": spread(unseen),
            "own_site_accuracy": spread([statistics.mean(r[name]["own"]) for r in runs.values()]),
            "megabytes_left_sites": round(statistics.mean(r[name]["bytes"] for r in runs.values()) / 1e6, 3),
            "seconds": round(statistics.mean(r[name]["seconds"] for r in runs.values()), 1),
        }  # fmt: skip
        if name == "own-adapter":  # per site: the best and the worst single hospital
            for pick, fn in (("best", max), ("worst", min)):
                ratio = [fn(r[name]["unseen"]) / statistics.mean(r["centralised"]["unseen"])
                         for r in runs.values()]  # fmt: skip
                table[name][f"{pick}_site_unseen_vs_centralised"] = spread(ratio)
    return dict(sorted(table.items(), key=lambda kv: -kv[1]["unseen_vs_centralised"]["mean"]))


def setups(quick: bool) -> list[tuple[str, int]]:
    if quick:
        return [("tissue", 5), ("generated", 5)]
    return [("tissue", 5), ("generated", 5), ("generated", 10)]


def load(kind: str, seed: int, n: int) -> Data:
    if kind == "digits":
        return digits(seed, n)
    return tissue(seed, n) if kind == "tissue" else generated(seed, n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="5 sites, one seed, 5 strategies")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--data", choices=["tissue", "generated", "digits"], default=None)
    p.add_argument("--sites", type=int, default=None)
    args = p.parse_args()
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2, 3, 4])
    chosen = [(args.data, args.sites or 5)] if args.data else setups(args.quick)
    for kind, n in chosen:
        runs: dict[str, dict[str, Row]] = {}
        started = time.perf_counter()
        for seed in seeds:
            data = load(kind, seed, n)
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as d:
                runs[str(seed)] = run_seed(Path(d), seed, data, args.quick)
            brief = {k: round(statistics.mean(v["unseen"]), 3) for k, v in runs[str(seed)].items()}
            print(
                kind,
                n,
                "seed",
                seed,
                f"{time.perf_counter() - t0:.0f} s",
                json.dumps(brief),
                flush=True,
            )
        result = {
            "data": kind, "sites": n, "unseen_sites": UNSEEN, "model": MODEL, "lora": LORA,
            "epochs_per_round": EPOCHS, "rounds": ROUNDS, "learning_rate": LEARNING_RATE,
            "fedprox_mu": FEDPROX_MU, "seeds": seeds, "quick": args.quick,
            "wall_seconds": round(time.perf_counter() - started, 1),
            "flower": _flower_version(), "table": summarise(runs), "runs": runs,
            "date": time.strftime("%Y-%m-%d"),
        }  # fmt: skip
        suffix = "_quick" if args.quick else ""
        out = ROOT / "benchmarks" / "results" / f"cross_site_{kind}_{n}{suffix}.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


def _flower_version() -> str:
    import flwr

    return str(flwr.__version__)


if __name__ == "__main__":
    main()
