"""What differential privacy costs and what it buys, for one hospital's adapter.

Two setups from benchmarks/real_images.py, on its small CLIP pretrained on a public part:
- digits: scikit-learn's digit scans through the first hospital's scanner (a two-digit task);
- generated: the first generated task of tests/merge_experiment.py.

The hospital trains its LoRA adapter (the same rank, epochs, batch size and learning rate in every
row) without differential privacy, and with DP-SGD at epsilon 1, 3 and 8 (delta 1e-5, clipping
1.0, Poisson sampling; medforge_trainer.private). Two figures per row:
- accuracy on held-out images, and its ratio to the run without DP;
- a loss-threshold membership-inference attack (Yeom et al.): the attacker ranks images by the
  adapter's loss on them, and the AUC says how well that tells the hospital's training images
  from held-out images of the same task (0.5: not at all).

Each row is the mean over seeds, with the min and max.

    .venv/bin/python benchmarks/privacy.py [--seeds 3] [--epochs 30] [--train-per-class 20]

Writes benchmarks/results/privacy.json (privacy_20_per_class.json with --train-per-class 20: a
smaller training set, which the adapter overfits and the attack has more to find in).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.real_images import (  # noqa: E402
    LORA,
    MODEL,
    PUBLIC_LEARNING_RATE,
    Data,
    digits,
    generated,
    write,
)
from medforge_ml.synthetic import tiny_clip  # noqa: E402
from medforge_trainer import config, dataset, model, private, train  # noqa: E402
from tests.merge_experiment import all_images, train_vision  # noqa: E402

EPSILONS = (1.0, 3.0, 8.0)
DELTA = 1e-5


def auc(members: np.ndarray, others: np.ndarray) -> float:
    """P(score of a member > score of a non-member), ties counted half (Mann-Whitney)."""
    m, o = members[:, None], others[None, :]
    return float(((m > o).sum() + 0.5 * (m == o).sum()) / (len(members) * len(others)))


def losses(clf: Any, split: dataset.Split, norm: Any) -> tuple[np.ndarray, float]:
    """Each image's cross-entropy and the accuracy."""
    with torch.no_grad():
        logits = torch.cat(
            [clf(norm(split.images[i : i + 64])) for i in range(0, len(split.labels), 64)]
        )
    loss = torch.nn.functional.cross_entropy(logits.float(), split.labels, reduction="none")
    acc = float((logits.argmax(1) == split.labels).float().mean())
    return loss.numpy(), acc


def run(root: Path, data: Data, seed: int, epochs: int, per_class: int | None) -> dict[str, Any]:
    hospital = data.hospitals[0]
    if per_class is not None:  # fewer training images: the adapter overfits, the attack has more
        rng = np.random.default_rng(seed)
        hospital = replace(
            hospital,
            train={
                c: [imgs[i] for i in rng.permutation(len(imgs))[:per_class]]
                for c, imgs in hospital.train.items()
            },
        )
    base = tiny_clip(root / "clip", seed=seed, **MODEL)
    classes = sorted(data.public)
    clip, tokenizer, raw = model.load_base(base)
    images, labels = all_images(base, write(root / "public", data.public), classes, 0.0)
    head = model.Classifier(clip, "clip-prompt", tuple(classes), tokenizer)
    train_vision(clip, [(head, images, labels)], seed, PUBLIC_LEARNING_RATE * 3, epochs=3)
    clip.save_pretrained(str(base))
    size, mean, std = model.image_settings(base, raw)
    task = tuple(hospital.classes)
    member = dataset.load(write(root / "train", hospital.train), task, size, 0.0, seed, 0.0).train
    held = dataset.load(write(root / "held", hospital.heldout), task, size, 0.0, seed, 0.0)
    heldout = dataset.Split(
        torch.cat([held.train.images, held.validation.images]),
        torch.cat([held.train.labels, held.validation.labels]),
    )
    rt = train.Runtime(torch.device("cpu"), None)
    norm = train.normalizer(mean, std, rt.device)
    settings = config.TrainingSettings(
        epochs=epochs, batch_size=16, learning_rate=0.003, seed=seed, compile="never"
    )
    lora = config.LoraSettings(
        rank=LORA["rank"],
        alpha=LORA["alpha"],
        dropout=0.0,
        target_modules=tuple(LORA["targetModules"]),
    )
    # The same settings in every row but the last, which gives DP-SGD what it usually needs:
    # larger batches (less noise per image) and a larger learning rate.
    tuned = replace(settings, batch_size=64, learning_rate=0.01)
    variants = [("none", None, settings)]
    variants += [(f"epsilon {e:g}", e, settings) for e in EPSILONS]
    variants.append(("epsilon 8, batch 64, lr 0.01", 8.0, tuned))
    rows: dict[str, Any] = {}
    for label, eps, these in variants:
        torch.manual_seed(seed)
        fresh, tok, _ = model.load_base(base)
        clf = model.add_lora(model.Classifier(fresh, "clip-prompt", task, tok), lora)
        t0 = time.perf_counter()
        spent = None
        if eps is None:
            train.train(clf, member, these, rt, norm, log=lambda _: None)
        else:
            privacy = config.PrivacySettings(eps, DELTA, 1.0, "prv")
            _, report = private.train_private(
                clf, member, these, privacy, rt, norm, log=lambda _: None
            )
            spent = report["epsilon"]
        seconds = time.perf_counter() - t0
        clf.eval()
        m_loss, _ = losses(clf, member, norm)
        h_loss, accuracy = losses(clf, heldout, norm)
        rows[label] = {
            "accuracy": accuracy,
            "attackAuc": auc(-m_loss, -h_loss),
            "epsilonSpent": spent,
            "seconds": round(seconds, 2),
            "trainImages": len(member.labels),
            "heldoutImages": len(heldout.labels),
        }
    return rows


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for row in runs[0]:
        acc = [r[row]["accuracy"] for r in runs]
        att = [r[row]["attackAuc"] for r in runs]
        ratio = [r[row]["accuracy"] / r["none"]["accuracy"] for r in runs]
        out[row] = {
            "accuracy": [round(float(np.mean(acc)), 4), round(min(acc), 4), round(max(acc), 4)],
            "accuracyRatio": round(float(np.mean(ratio)), 4),
            "attackAuc": [round(float(np.mean(att)), 4), round(min(att), 4), round(max(att), 4)],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument(
        "--train-per-class", type=int, default=None, help="subsample the hospital's training set"
    )
    args = ap.parse_args()
    results: dict[str, Any] = {
        "epochs": args.epochs,
        "delta": DELTA,
        "clipping": 1.0,
        "trainPerClass": args.train_per_class,
    }
    for name, make in (("digits", lambda s: digits(s, 5)), ("generated", generated)):
        runs = []
        for seed in range(args.seeds):
            with tempfile.TemporaryDirectory() as tmp:
                runs.append(run(Path(tmp), make(seed), seed, args.epochs, args.train_per_class))
            print(name, seed, json.dumps(runs[-1]), flush=True)
        results[name] = {"summary": summarise(runs), "runs": runs}
        print(name, json.dumps(results[name]["summary"], indent=1), flush=True)
    suffix = f"_{args.train_per_class}_per_class" if args.train_per_class else ""
    out = ROOT / "benchmarks" / "results" / f"privacy{suffix}.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
