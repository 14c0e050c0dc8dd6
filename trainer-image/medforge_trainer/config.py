"""The job config (see design.md, "Job contract"), checked and typed before any work starts.

The operator writes it from a LoRAContribution's spec; by hand, a hospital writes the same JSON
with local paths (`baseModel.path`, `dataset.path`, `--output-dir`)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from medforge_trainer.errors import ConfigError

JSON = dict[str, Any]
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
HEADS = ("clip-prompt", "linear")
PRECISIONS = ("auto", "fp32", "bf16")
COMPILE = ("auto", "always", "never")  # torch.compile: auto = on a GPU only
# (not on/off: YAML 1.1, which kubectl reads, turns those into booleans)


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.1
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")


@dataclass(frozen=True)
class TrainingSettings:
    epochs: int = 3
    batch_size: int | None = None  # None: 32 on a CPU, the largest that fits on a GPU
    learning_rate: float = 1e-4
    seed: int = 0
    precision: str = "auto"
    weight_decay: float = 0.0
    compile: str = "auto"
    # FedProx's mu: (mu / 2) * ||dW||^2 of the adapter's update added to the loss, which keeps
    # it near its starting point (the base model, or the revision of spec.startFrom).
    proximal_mu: float = 0.0


@dataclass(frozen=True)
class DistillSettings:
    images_per_class: int = 0
    iterations: int = 1000
    learning_rate: float = 10.0
    real_batch: int = 64


ACCOUNTANTS = ("prv", "rdp")


@dataclass(frozen=True)
class PrivacySettings:
    """Differential privacy (DP-SGD) for this run: the (epsilon, delta) it may spend."""

    epsilon: float
    delta: float
    max_grad_norm: float = 1.0
    accountant: str = "prv"


@dataclass(frozen=True)
class DatasetSettings:
    uri: str  # s3://bucket/prefix/ or a local directory
    validation_fraction: float = 0.2
    endpoint: str | None = None
    credentials_from_env: bool = False
    max_corrupt_fraction: float = 0.05


@dataclass(frozen=True)
class ParentSettings:
    """spec.startFrom as the operator resolved it: the composite revision to train on top of
    (its verified files by URL, or a pulled folder by hand)."""

    composite: str  # namespace/name
    revision: int
    digest: str  # sha256 of the revision's manifest.json
    files: tuple[JSON, ...] = ()
    path: str | None = None


@dataclass(frozen=True)
class TrainConfig:
    task: str
    classes: tuple[str, ...]
    head: str
    base_digest: str
    base_files: tuple[JSON, ...]  # [{name, url} | {name, path}]
    base_path: str | None
    dataset: DatasetSettings
    lora: LoraSettings = field(default_factory=LoraSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    distillation: DistillSettings = field(default_factory=DistillSettings)
    privacy: PrivacySettings | None = None
    output_uri: str = ""
    output_files: dict[str, str] = field(default_factory=dict)
    contribution: JSON = field(default_factory=dict)
    signing_key: str = ""  # the mounted private key (signing.keyFile): sign the output folder
    parent: ParentSettings | None = None


def _obj(cfg: JSON, key: str, path: str) -> JSON:
    value = cfg.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}{key}: expected an object, got {type(value).__name__}")
    return value


def _num(
    section: JSON,
    key: str,
    path: str,
    default: float,
    lo: float,
    hi: float,
    integer: bool = False,
    lo_open: bool = False,
) -> Any:
    value = section.get(key, default)
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type or (not integer and not math.isfinite(value)):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{path}.{key}: expected {kind}, got {value!r}")
    if value < lo or value > hi or (lo_open and value == lo):
        left = "(" if lo_open else "["
        raise ConfigError(f"{path}.{key}: {value!r} is outside {left}{lo}, {hi}]")
    return int(value) if integer else float(value)


def _task(cfg: JSON) -> tuple[str, tuple[str, ...], str]:
    task = _obj(cfg, "task", "")
    name = task.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError("task.name: a task name is required")
    classes = task.get("classes")
    if (
        not isinstance(classes, list)
        or len(classes) < 2
        or not all(isinstance(c, str) and c for c in classes)
    ):
        raise ConfigError("task.classes: list at least two class names (the dataset's folders)")
    if len(set(classes)) != len(classes):
        raise ConfigError("task.classes: class names must be unique")
    head = task.get("head", "clip-prompt")
    if head not in HEADS:
        raise ConfigError(f"task.head: {head!r} is not one of {', '.join(HEADS)}")
    return name, tuple(classes), head


def _base_model(cfg: JSON) -> tuple[str, tuple[Any, ...], str | None]:
    base = _obj(cfg, "baseModel", "")
    digest = base.get("digest")
    if not isinstance(digest, str) or not digest.startswith("sha256:") or len(digest) != 71:
        raise ConfigError("baseModel.digest: expected sha256:<64 hex digits> of its manifest.json")
    files = base.get("files") or []
    if not isinstance(files, list) or not all(
        isinstance(f, dict) and isinstance(f.get("name"), str) and ("url" in f or "path" in f)
        for f in files
    ):
        raise ConfigError("baseModel.files: expected a list of {name, url} or {name, path}")
    base_path = base.get("path")
    if not files and not isinstance(base_path, str):
        raise ConfigError(
            "baseModel: give files (presigned URLs, set by the operator) or path (a local "
            "directory holding the model and its manifest.json)"
        )
    return digest, tuple(files), base_path if isinstance(base_path, str) else None


def _dataset(cfg: JSON) -> DatasetSettings:
    ds = _obj(cfg, "dataset", "")
    uri = ds.get("path") or ds.get("uri")
    if not isinstance(uri, str) or not uri:
        raise ConfigError("dataset.uri: an s3://bucket/prefix/ or a local directory is required")
    if uri.startswith("pvc://"):
        raise ConfigError(
            "dataset.path: a pvc:// dataset is read from its mount; the operator sets "
            "dataset.path, by hand give the local directory"
        )
    return DatasetSettings(
        uri=uri,
        validation_fraction=_num(ds, "validationFraction", "dataset", 0.2, 0.0, 0.9, lo_open=True),
        endpoint=ds.get("endpoint") or None,
        credentials_from_env=bool(ds.get("credentialsFromEnv")),
        max_corrupt_fraction=_num(ds, "maxCorruptFraction", "dataset", 0.05, 0.0, 1.0),
    )


def _lora(cfg: JSON) -> LoraSettings:
    lo = _obj(cfg, "lora", "")
    targets = lo.get("targetModules", ["q_proj", "v_proj"])
    if (
        not isinstance(targets, list)
        or not targets
        or not all(isinstance(t, str) and t for t in targets)
    ):
        raise ConfigError(
            "lora.targetModules: list the module names to adapt, e.g. [q_proj, v_proj]"
        )
    return LoraSettings(
        rank=_num(lo, "rank", "lora", 16, 1, 1024, integer=True),
        alpha=_num(lo, "alpha", "lora", 16.0, 0.0, 4096.0, lo_open=True),
        dropout=_num(lo, "dropout", "lora", 0.1, 0.0, 0.9),
        target_modules=tuple(targets),
    )


def _training(cfg: JSON) -> TrainingSettings:
    tr = _obj(cfg, "training", "")
    precision = tr.get("precision", "auto")
    if precision not in PRECISIONS:
        raise ConfigError(
            f"training.precision: {precision!r} is not one of {', '.join(PRECISIONS)}"
        )
    compile_ = tr.get("compile", "auto")
    if compile_ not in COMPILE:
        raise ConfigError(f"training.compile: {compile_!r} is not one of {', '.join(COMPILE)}")
    batch = tr.get("batchSize")
    return TrainingSettings(
        epochs=_num(tr, "epochs", "training", 3, 1, 1000, integer=True),
        batch_size=(
            None if batch is None else _num(tr, "batchSize", "training", 32, 1, 4096, integer=True)
        ),
        learning_rate=_num(tr, "learningRate", "training", 1e-4, 0.0, 1.0),  # 0: a control run
        seed=_num(tr, "seed", "training", 0, 0, 2**32 - 1, integer=True),
        precision=precision,
        weight_decay=_num(tr, "weightDecay", "training", 0.0, 0.0, 1.0),
        compile=compile_,
        proximal_mu=_num(tr, "proximalMu", "training", 0.0, 0.0, 1000.0),
    )


def _distillation(cfg: JSON) -> DistillSettings:
    di = _obj(cfg, "distillation", "")
    return DistillSettings(
        images_per_class=_num(di, "imagesPerClass", "distillation", 0, 0, 1000, integer=True),
        iterations=_num(di, "iterations", "distillation", 1000, 1, 100000, integer=True),
        learning_rate=_num(di, "learningRate", "distillation", 10.0, 0.0, 1000.0, lo_open=True),
        real_batch=_num(di, "realBatch", "distillation", 64, 1, 4096, integer=True),
    )


def _privacy(cfg: JSON, distillation: DistillSettings) -> PrivacySettings | None:
    pr = cfg.get("privacy")
    if pr is None or pr == {}:
        return None
    pr = _obj(cfg, "privacy", "")
    for key in ("epsilon", "delta"):
        if key not in pr:
            raise ConfigError(f"privacy.{key}: required when privacy is set")
    accountant = pr.get("accountant", "prv")
    if accountant not in ACCOUNTANTS:
        raise ConfigError(
            f"privacy.accountant: {accountant!r} is not one of {', '.join(ACCOUNTANTS)}"
        )
    if (_obj(cfg, "training", "").get("proximalMu") or 0) > 0:
        raise ConfigError(
            "training.proximalMu: not available with privacy (DP-SGD clips per-sample "
            "gradients of the loss alone); set one or the other"
        )
    if distillation.images_per_class > 0:
        # The distilled set is optimised on the raw images without noise: releasing it would
        # void the run's guarantee.
        raise ConfigError(
            "privacy: a distilled set cannot be released from a differentially private run; "
            "set distillation.imagesPerClass to 0 (exact merges need no distilled set)"
        )
    return PrivacySettings(
        epsilon=_num(pr, "epsilon", "privacy", 1.0, 0.0, 100.0, lo_open=True),
        delta=_num(pr, "delta", "privacy", 1e-5, 0.0, 0.1, lo_open=True),
        max_grad_norm=_num(pr, "maxGradNorm", "privacy", 1.0, 0.0, 1000.0, lo_open=True),
        accountant=accountant,
    )


def parse_shared(
    cfg: JSON,
) -> tuple[
    tuple[str, tuple[str, ...], str], tuple[str, tuple[Any, ...], str | None], DatasetSettings
]:
    """The task, base model and dataset of a config, as training reads them (shared with
    `medforge-evaluate`, whose sets have the same layout and checks)."""
    return _task(cfg), _base_model(cfg), _dataset(cfg)


def parse(cfg: Any) -> TrainConfig:
    """Check the whole config and return it typed, or raise ConfigError naming the field."""
    if not isinstance(cfg, dict):
        raise ConfigError("the job config must be a JSON object")
    name, classes, head = _task(cfg)
    digest, files, base_path = _base_model(cfg)
    dataset, lora, training = _dataset(cfg), _lora(cfg), _training(cfg)
    distillation = _distillation(cfg)
    privacy = _privacy(cfg, distillation)
    out = _obj(cfg, "output", "")
    out_files = out.get("files") or {}
    if not isinstance(out_files, dict):
        raise ConfigError("output.files: expected a map of file name to presigned PUT URL")
    return TrainConfig(
        task=name,
        classes=classes,
        head=head,
        base_digest=digest,
        base_files=files,
        base_path=base_path,
        dataset=dataset,
        lora=lora,
        training=training,
        distillation=distillation,
        privacy=privacy,
        output_uri=str(out.get("uri") or ""),
        output_files={str(k): str(v) for k, v in out_files.items()},
        contribution=_obj(cfg, "contribution", ""),
        signing_key=_signing_key(cfg),
        parent=_parent(cfg),
    )


def _parent(cfg: JSON) -> ParentSettings | None:
    raw = _obj(cfg, "startFrom", "")
    if not raw:
        return None
    composite, revision, digest = raw.get("composite"), raw.get("revision"), raw.get("digest")
    if not isinstance(composite, str) or composite.count("/") != 1:
        raise ConfigError("startFrom.composite: expected namespace/name of a CompositeModel")
    if isinstance(revision, bool) or not isinstance(revision, int) or revision < 1:
        raise ConfigError(f"startFrom.revision: expected a revision number, got {revision!r}")
    if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
        raise ConfigError("startFrom.digest: expected sha256:<64 hex digits> of its manifest.json")
    files, path = raw.get("files") or [], raw.get("path")
    if not isinstance(files, list) or not all(
        isinstance(f, dict) and isinstance(f.get("name"), str) for f in files
    ):
        raise ConfigError("startFrom.files: expected a list of {name, url} or {name, path}")
    if not files and not isinstance(path, str):
        raise ConfigError("startFrom: give files (set by the operator) or path (a pulled revision)")
    return ParentSettings(composite, revision, digest, tuple(files), path if not files else None)


def _signing_key(cfg: JSON) -> str:
    key = _obj(cfg, "signing", "").get("keyFile", "")
    if not isinstance(key, str):
        raise ConfigError("signing.keyFile: expected the private key's path")
    return key
