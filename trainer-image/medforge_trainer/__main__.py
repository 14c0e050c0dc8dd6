"""`medforge-train`: job config in; the base model and dataset verified; a LoRA adapter trained
and evaluated; optionally a distilled summary set; safetensors plus manifest.json out (presigned
PUT URLs, or a directory by hand); the result JSON in the termination message. Any failure:
non-zero exit and a one-line reason there."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from medforge_common.api import ExitCode
from medforge_common.artifacts import (
    ADAPTER_FILE,
    DISTILLED_FILE,
    FINGERPRINTS_FILE,
    HEAD_FILE,
    MANIFEST_FILE,
)
from medforge_common.attestation import SIGNATURE_FILE, BadKey, private_key_id, sign_folder
from medforge_common.manifest import Manifest
from medforge_common.redact import redact
from medforge_common.result import (
    JobConfigError,
    failure_line,
    finite_number,
    job_parser,
)
from medforge_ml import composite
from medforge_ml.basemodel import prepare_model_dir
from medforge_ml.errors import ModelError
from medforge_ml.job import Ladder, Run, line, run_job
from medforge_trainer import VERSION, config, dataset, distill, model, private, sources, train
from medforge_trainer.errors import ConfigError, TrainFailed

JSON = dict[str, Any]


def log(line: str) -> None:
    print(redact(line), flush=True)  # pod logs are visible to viewers


@dataclass
class Prepared:
    """The base model loaded and the dataset split, ready to train on."""

    base: Any
    tokenizer: Any
    base_config: JSON
    mean: tuple[float, ...]
    std: tuple[float, ...]
    data: dataset.LoadedDataset


def _prepare(cfg: config.TrainConfig, work: Path) -> Prepared:
    """The verified base model and the institution's images, split for validation."""
    base_dir = sources.fetch_base_model(cfg, work / "base")
    log(f"base model {cfg.base_digest[:19]}... verified")
    base, tokenizer, base_config = model.load_base(base_dir)
    if cfg.parent is not None:  # spec.startFrom: the revision's update folded into the weights
        parent = sources.fetch_parent(cfg.parent, cfg.base_digest, work / "parent")
        (updates,) = composite.read_updates(parent)
        composite.add_updates(base, updates[1])
        log(f"started from {cfg.parent.composite} revision {cfg.parent.revision} (verified)")
    size, mean, std = model.image_settings(base_dir, base_config)
    root = sources.materialize_dataset(cfg.dataset, work / "data")
    data = dataset.load(
        root,
        cfg.classes,
        size,
        cfg.dataset.validation_fraction,
        cfg.training.seed,
        cfg.dataset.max_corrupt_fraction,
        spill_dir=work / "decoded",
    )
    log(
        f"dataset: {len(data.train.labels)} train / {len(data.validation.labels)} validation "
        f"images, {len(cfg.classes)} classes, {data.corrupt} unreadable or oversized and "
        f"{data.outside} outside links skipped; decoded at {data.decode_images_per_second:.0f} "
        f"images/s on {data.workers} thread(s)"
    )
    return Prepared(base, tokenizer, base_config, mean, std, data)


def _distilled(
    cfg: config.TrainConfig, clf: Any, p: Prepared, norm: Any, rt: train.Runtime, work: Path
) -> tuple[Path, dict[str, float]]:
    """The distilled summary set (distribution matching on the frozen features), saved, and
    the distillation's figures."""
    for param in clf.parameters():
        param.requires_grad_(False)
    images, labels, figures = distill.distill(
        clf.features,
        p.data.train,
        len(cfg.classes),
        cfg.distillation,
        norm,
        cfg.training.seed,
        rt,
        log,
    )
    save_file(
        {"images": images.contiguous(), "labels": labels},
        str(work / DISTILLED_FILE),
        metadata={
            "classes": json.dumps(list(cfg.classes)),
            "task": cfg.task,
            "space": "normalized",
            "image_mean": json.dumps(list(p.mean)),
            "image_std": json.dumps(list(p.std)),
        },
    )
    return work / DISTILLED_FILE, figures


def _finite(x: float, digits: int) -> float | None:
    n = finite_number(x)
    return None if n is None else round(n, digits)


def _manifest_meta(
    cfg: config.TrainConfig,
    p: Prepared,
    metrics: JSON,
    stats: JSON,
    device: str,
    distilled: dict[str, float],
) -> JSON:
    return {
        "task": cfg.task,
        "classes": list(cfg.classes),
        "head": cfg.head,
        "rank": cfg.lora.rank,
        "alpha": cfg.lora.alpha,
        "dropout": cfg.lora.dropout,
        "targetModules": list(cfg.lora.target_modules),
        "metrics": metrics,
        "datasetFingerprint": p.data.fingerprint,
        "samples": {"train": len(p.data.train.labels), "validation": len(p.data.validation.labels)},
        "corruptSkipped": p.data.corrupt,
        "linksOutsideSkipped": p.data.outside,
        "seed": cfg.training.seed,
        "training": {
            "epochs": cfg.training.epochs,
            "batchSize": int(stats["batchSize"]),
            "learningRate": cfg.training.learning_rate,
            **({"proximalMu": cfg.training.proximal_mu} if cfg.training.proximal_mu else {}),
            "device": device,
            "imagesPerSecond": round(stats["imagesPerSecond"], 2),
            "imagesPerSecondAfterFirstEpoch": _finite(stats["imagesPerSecondAfterFirstEpoch"], 2),
            "secondsToFirstStep": _finite(stats["secondsToFirstStep"], 3),
            "decodeImagesPerSecond": _finite(p.data.decode_images_per_second, 1),
            "seconds": round(stats["seconds"], 3),
            "loss": _finite(stats["loss"], 6),
        },
        "distillation": {
            "imagesPerClass": cfg.distillation.images_per_class,
            "iterations": cfg.distillation.iterations,
            **{k: _finite(v, 3) for k, v in distilled.items()},
        },
        "baseModelType": p.base_config.get("model_type"),
        "tool": f"medforge-train {VERSION}",
        **({"parent": _parent(cfg.parent)} if cfg.parent is not None else {}),
    }


def _parent(parent: config.ParentSettings) -> JSON:
    """What the adapter is relative to: the merger adds it to this revision's update."""
    return {"composite": parent.composite, "revision": parent.revision, "digest": parent.digest}


def _publish(
    cfg: config.TrainConfig,
    manifest: Manifest,
    out: list[Path],
    work: Path,
    output_dir: Path | None,
) -> JSON:
    """Upload the files and their manifest (and their signature, when the hospital signs);
    the artifact part of the result."""
    entries = [manifest.add_file(p) for p in out]
    manifest_path = work / MANIFEST_FILE
    manifest_path.write_text(manifest.to_json())
    files = [*out, manifest_path]
    if cfg.signing_key:
        files.append(sign(files, Path(cfg.signing_key), work))
    for p in files:
        sources.upload(p.name, p, cfg, output_dir)
    return {
        "uri": cfg.output_uri or (str(output_dir) if output_dir else ""),
        "digest": manifest.digest(),
        "sizeBytes": sum(e.size for e in entries),
    }


def sign(files: list[Path], key: Path, work: Path) -> Path:
    """Sign exactly `files` (links in a folder of their own) with the hospital's key, in the
    OpenSSF model-signing format; the bundle's path."""
    folder = work / "signed"
    folder.mkdir(exist_ok=True)
    for p in files:
        (folder / p.name).unlink(missing_ok=True)
        os.link(p, folder / p.name)
    out = work / SIGNATURE_FILE
    try:
        sign_folder(folder, key, out)
        log(f"signed {len(files)} files with key {private_key_id(key.read_bytes())[:16]}")
    except (OSError, BadKey) as exc:
        raise TrainFailed(
            f"signing the output with spec.signing.keySecretRef's key failed: {exc}"
        ) from None
    return out


def run(cfg: config.TrainConfig, work: Path, output_dir: Path | None) -> JSON:
    """Fetch and verify, train, validate, distil, upload; the result JSON."""
    started = time.perf_counter()
    torch.manual_seed(cfg.training.seed)
    rt = train.pick_runtime(cfg.training.precision, cfg.training.compile)
    p = _prepare(cfg, work)
    clf = model.add_lora(model.Classifier(p.base, cfg.head, cfg.classes, p.tokenizer), cfg.lora)
    clf.to(rt.device)
    norm = train.normalizer(p.mean, p.std, rt.device)
    log(f"training on {rt.describe()}")
    privacy: JSON | None = None
    if cfg.privacy is not None:
        stats, privacy = private.train_private(
            clf, p.data.train, cfg.training, cfg.privacy, rt, norm, log
        )
    else:
        scale = cfg.lora.alpha / cfg.lora.rank
        stats = train.train(
            clf, p.data.train, cfg.training, rt, norm, log, started=started, lora_scale=scale
        )
    log(
        f"trained at batch size {int(stats['batchSize'])}: first step after "
        f"{stats['secondsToFirstStep']:.1f} s, {stats['imagesPerSecond']:.1f} img/s"
    )
    metrics = train.evaluate(clf, p.data.validation, rt, norm)
    log("validation: " + json.dumps(metrics))

    out = [work / ADAPTER_FILE]
    save_file(model.adapter_state(clf), str(out[0]), metadata={"format": "pt"})
    head = model.head_state(clf)
    if head:
        save_file(head, str(work / HEAD_FILE), metadata={"format": "pt"})
        out.append(work / HEAD_FILE)
    distilled: dict[str, float] = {}
    if cfg.distillation.images_per_class > 0:
        path, distilled = _distilled(cfg, clf, p, norm, rt, work)
        out.append(path)
    if p.data.files:
        (work / FINGERPRINTS_FILE).write_text(json.dumps({"files": p.data.files}))
        out.append(work / FINGERPRINTS_FILE)
    meta = _manifest_meta(cfg, p, metrics, stats, rt.device.type, distilled)
    if privacy is not None:
        meta["privacy"] = privacy
    manifest = Manifest("contribution", cfg.base_digest, [], meta)
    return {
        "artifact": _publish(cfg, manifest, out, work, output_dir),
        "metrics": metrics,
        "training": meta["training"],
        **({"privacy": privacy} if privacy is not None else {}),
    }


def prepare_base_model(directory: Path) -> int:
    """Write manifest.json for a save_pretrained directory and print its digest."""
    print(prepare_model_dir(directory, f"medforge-train {VERSION}").digest())
    return 0


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError | torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text
    )


def _parse(raw: Any) -> config.TrainConfig:
    try:
        return config.parse(raw)
    except ConfigError as exc:
        raise JobConfigError(f"invalid job config: {exc}") from exc


def _work(job: Run[config.TrainConfig]) -> JSON:
    started = time.monotonic()
    result = run(job.cfg, job.work, job.output_dir)
    log(f"done in {time.monotonic() - started:.1f} s")
    return result


def _out_of_memory(exc: BaseException, job: Run[config.TrainConfig]) -> tuple[str, int] | None:
    if not is_oom(exc):
        return None
    why = (
        "training failed: out of memory at batch size "
        f"{job.cfg.training.batch_size or 'auto'}; set a lower "
        "spec.training.batchSize or give the Job more memory"
    )
    return failure_line(why), ExitCode.FAILED


LADDER: Ladder[config.TrainConfig] = [
    (ModelError, line("training failed")),  # TrainFailed, and the shared loaders' failures
    (Exception, _out_of_memory),
]


def main(argv: list[str] | None = None) -> int:
    p = job_parser("medforge-train", __doc__.splitlines()[0], "the outputs")
    p.add_argument(
        "--prepare-base-model",
        metavar="DIR",
        help="write manifest.json for a save_pretrained directory, print its digest, and exit",
    )
    args = p.parse_args(argv)
    if args.prepare_base_model:
        try:
            return prepare_base_model(Path(args.prepare_base_model))
        except (OSError, ModelError) as exc:
            print(failure_line(str(exc)), file=sys.stderr)
            return 1
    return run_job(args, _parse, _work, LADDER, "train", "training failed")


if __name__ == "__main__":
    sys.exit(main())
