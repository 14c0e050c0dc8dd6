"""`medforge predict`, `medforge evaluate` and the merged export: a composite on its verified
base model (torch; the rest of the command line never imports it)."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from medforge_cli.errors import CliError

JSON = dict[str, Any]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")


def _model_error(exc: Exception) -> CliError:
    return CliError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def merged(base_dir: Path, composite_dir: Path, out: Path) -> None:
    from medforge_ml.composite import write_merged
    from medforge_ml.errors import ModelError

    try:
        write_merged(base_dir, composite_dir, out)
    except ModelError as exc:
        raise _model_error(exc) from None


def _local_base(args: argparse.Namespace, digest: str) -> Path:
    """--base-model: a folder whose manifest.json must be the composite's base model."""

    from medforge_common.manifest import Manifest, ManifestError, digest_of, verify_dir

    base = Path(args.base_model)
    raw = (base / "manifest.json").read_bytes() if (base / "manifest.json").is_file() else b""
    if not raw:
        raise CliError(f"{base}: no manifest.json (medforge model push writes one)", 2)
    if digest and digest_of(raw) != digest:
        raise CliError(
            f"{base} is not the base model this composite was merged on ({digest[:19]}...)", 2
        )
    try:
        verify_dir(base, Manifest.from_json(raw.decode(), str(base / "manifest.json")))
    except ManifestError as exc:
        raise CliError(f"{base}: {exc}") from None
    return base


def _resolve(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """(base model folder, composite folder) for --composite DIR or NAME."""
    from medforge_cli import pull

    source = Path(args.composite)
    if source.is_dir():
        info_path = source / "medforge-export.json"
        info: JSON = json.loads(info_path.read_text()) if info_path.is_file() else {}
        if info.get("format", "raw") != "raw":
            raise CliError(f"{source} was pulled as {info['format']}; pull it with --format raw", 2)
        base_info = info.get("baseModel") or {}
        if args.base_model:
            return _local_base(args, str(base_info.get("digest", ""))), source
        if not base_info.get("name"):
            raise CliError(
                f"{source}: no medforge-export.json naming its base model; pass --base-model DIR", 2
            )
        from medforge_cli.cluster import Cluster

        cl = Cluster.connect(args.kubeconfig, args.context)
        return pull.fetch_base_model(cl, args, base_info["name"], base_info["digest"]), source
    pulled = work / "composite"
    pull_args = argparse.Namespace(
        **vars(args), name=args.composite, format="raw", output=str(pulled), rank=None
    )
    pull.pull(pull_args)
    info = json.loads((pulled / "medforge-export.json").read_text())
    if args.base_model:
        return _local_base(args, info["baseModel"]["digest"]), pulled
    from medforge_cli.cluster import Cluster

    cl = Cluster.connect(args.kubeconfig, args.context)
    base = pull.fetch_base_model(cl, args, info["baseModel"]["name"], info["baseModel"]["digest"])
    return base, pulled


def _predictor(args: argparse.Namespace, work: Path) -> Any:
    from medforge_ml.composite import Predictor
    from medforge_ml.errors import ModelError

    base, composite = _resolve(args, work)
    try:
        return Predictor(base, composite, args.device)
    except (ModelError, RuntimeError) as exc:
        raise _model_error(exc) from None


def _images(paths: list[Path], size: int) -> Any:
    import torch

    from medforge_ml.composite import load_image
    from medforge_ml.errors import ModelError

    try:
        return torch.stack([load_image(p, size) for p in paths])
    except ModelError as exc:
        raise _model_error(exc) from None


def predict(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.images]
    for p in paths:
        if not p.is_file():
            raise CliError(f"{p}: no such image file", 2)
    with tempfile.TemporaryDirectory() as tmp:
        pred = _predictor(args, Path(tmp))
        probs = pred.probabilities(_images(paths, pred.size))
    result: list[JSON] = [
        {
            "image": str(p),
            "tasks": {
                t.name: {
                    "prediction": t.classes[int(probs[t.name][i].argmax())],
                    "probabilities": {
                        c: round(float(probs[t.name][i][j]), 6) for j, c in enumerate(t.classes)
                    },
                }
                for t in pred.tasks
            },
        }
        for i, p in enumerate(paths)
    ]
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    from medforge_cli.views import table

    rows = [
        [
            r["image"],
            task,
            v["prediction"],
            " ".join(f"{c}={q:.3f}" for c, q in v["probabilities"].items()),
        ]
        for r in result
        for task, v in r["tasks"].items()
    ]
    print(table(["IMAGE", "TASK", "PREDICTION", "PROBABILITIES"], rows))
    return 0


def evaluate(args: argparse.Namespace) -> int:
    import torch

    from medforge_ml.metrics import classification_metrics

    folder = Path(args.folder)
    if not folder.is_dir():
        raise CliError(f"{folder}: not a folder (one subfolder of images per class)", 2)
    subfolders = {p.name: p for p in folder.iterdir() if p.is_dir()}
    with tempfile.TemporaryDirectory() as tmp:
        pred = _predictor(args, Path(tmp))
        tasks = [
            t
            for t in pred.tasks
            if (args.task is None or t.name == args.task) and set(subfolders) <= set(t.classes)
        ]
        if not tasks:
            names = ", ".join(f"{t.name} ({', '.join(t.classes)})" for t in pred.tasks)
            raise CliError(
                f"{folder}: its subfolders {sorted(subfolders)} are not the classes of "
                f"{'task ' + args.task if args.task else 'any task'}; tasks: {names}",
                2,
            )
        out: JSON = {}
        for t in tasks:
            files = [
                (f, t.classes.index(c))
                for c, d in sorted(subfolders.items())
                for f in sorted(d.iterdir())
                if f.suffix.lower() in IMAGE_SUFFIXES
            ]
            if not files:
                raise CliError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})", 2)
            probs = pred.probabilities(_images([f for f, _ in files], pred.size))[t.name]
            labels = torch.tensor([y for _, y in files])
            out[t.name] = {
                k: (round(v, 4) if isinstance(v, float) else v)
                for k, v in classification_metrics(labels, probs).items()
            }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    from medforge_cli.views import table

    keys = sorted({k for m in out.values() for k in m})
    print(
        table(
            ["TASK", *[k.upper() for k in keys]],
            [[t, *[str(m.get(k, "-")) for k in keys]] for t, m in out.items()],
        )
    )
    return 0


def run(args: argparse.Namespace) -> int:
    return predict(args) if args.command == "predict" else evaluate(args)
