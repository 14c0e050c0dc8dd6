"""The synthetic three-institution experiment: held-out accuracy of uniform averaging (linear,
weights 1/3) against fusion, fusion-exact and mixture, over several seeds.

    .venv/bin/python benchmarks/three_institutions.py [--seeds 0 1 2] [--base pretrained]
        [--noise 90]

`--base pretrained` first trains the tiny CLIP briefly on a few public images of every task (the
paper's regime: adapters on a base that already knows something); `--noise` sets the pixel noise
of every image set (50 by default; higher makes the tasks harder). Writes
benchmarks/results/three_institutions.json, or three_institutions_pretrained_noise90.json and the
like.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.merge_experiment import experiment  # noqa: E402


def normalised(runs: dict[str, Any]) -> dict[str, Any]:
    """Per strategy: accuracy on each task divided by that hospital's own adapter's on it (the
    merging literature's normalised accuracy), averaged over seeds; its mean and minimum."""
    out: dict[str, Any] = {}
    names = [n for n in next(iter(runs.values())) if n not in ("own-adapter", "base")]
    for n in names:
        per_task = []
        for r in runs.values():
            own = r["own-adapter"]["per_task"]
            per_task.append(
                [a / o if o else 0.0 for a, o in zip(r[n]["per_task"], own, strict=True)]
            )
        mean_per_task = [round(sum(col) / len(col), 4) for col in zip(*per_task, strict=True)]
        out[n] = {
            "per_task": mean_per_task,
            "mean": round(sum(mean_per_task) / len(mean_per_task), 4),
            "min": round(min(min(row) for row in per_task), 4),
        }
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["mean"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--base", choices=["random", "pretrained"], default="random")
    p.add_argument("--noise", type=float, default=50.0)
    p.add_argument("--out", default="")
    p.add_argument(
        "--every-strategy",
        action="store_true",
        help="the data-free merges too; reports accuracy normalised by each hospital's own "
        "adapter on its own task (mean and minimum)",
    )
    args = p.parse_args()
    suffix = (
        ("" if args.base == "random" else "_pretrained")
        + ("" if args.noise == 50.0 else f"_noise{args.noise:g}")
        + ("_every_strategy" if args.every_strategy else "")
    )
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"three_institutions{suffix}.json")
    build_args = {"pretrained": args.base == "pretrained", "noise": args.noise}
    runs: dict[str, Any] = {}
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as d, contextlib.redirect_stdout(io.StringIO()):
            runs[str(seed)] = experiment(
                Path(d), seed, every_strategy=args.every_strategy, **build_args
            )
        print(seed, json.dumps({k: v["mean"] for k, v in runs[str(seed)].items()}), flush=True)
    names = list(next(iter(runs.values())))
    summary = {n: round(sum(r[n]["mean"] for r in runs.values()) / len(runs), 4) for n in names}
    margins = {n: round(summary[n] - summary["uniform"], 4) for n in names if n != "uniform"}
    margins_ab = {
        n: round(summary[n] - summary["average-ab"], 4) for n in names if n != "average-ab"
    }
    margins_mix = {
        n: round(summary[n] - summary["uniform-mixture"], 4)
        for n in names
        if n != "uniform-mixture"
    }
    wins = {
        n: sum(r[n]["mean"] >= r["uniform"]["mean"] for r in runs.values())
        for n in names
        if n != "uniform"
    }
    result = {
        "normalised_accuracy": normalised(runs),
        "base": args.base,
        "noise": args.noise,
        "runs": runs,
        "mean_heldout_accuracy": summary,
        "margin_vs_uniform": margins,
        "margin_vs_average_ab": margins_ab,
        "margin_vs_uniform_mixture": margins_mix,
        "seeds_at_least_uniform": wins,
        "date": time.strftime("%Y-%m-%d"),
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
