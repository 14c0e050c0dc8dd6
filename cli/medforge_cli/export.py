"""A composite revision as a peft LoRA adapter folder: `PeftModel.from_pretrained(base, DIR)`.

The composite stores factor layers as `<module>.lora_A.weight` / `<module>.lora_B.weight` with
the scale folded into B, and dense layers (TIES, DARE) as `<module>.delta.weight`. peft wants
`base_model.model.<module>.lora_{A,B}.weight`, and scales B A by lora_alpha / r per module, so
each module's alpha is set to its own rank (scale 1). Dense layers become rank-`rank` factors by
a truncated SVD, with the reconstruction error reported. numpy and safetensors only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from medforge_cli.errors import CliError
from medforge_common.manifest import Manifest

JSON = dict[str, Any]
ADAPTER = "adapter.safetensors"
A, B, DELTA = ".lora_A.weight", ".lora_B.weight", ".delta.weight"
PEFT_PREFIX = "base_model.model."
# The classifier wraps a non-CLIP backbone as `backbone`; peft wraps the backbone itself.
CLASSIFIER_PREFIX = "backbone."


def _module(key: str, suffix: str) -> str:
    return key[: -len(suffix)].removeprefix(CLASSIFIER_PREFIX)


def _layer(
    f: Any,
    k: str,
    rank: int | None,
    tensors: dict[str, np.ndarray[Any, Any]],
    ranks: dict[str, int],
    errors: list[tuple[float, float]],
) -> None:
    """One tensor of the composite into peft's names: factors as they are, a dense update
    (TIES, DARE) by its best rank-`rank` approximation, whose error is recorded."""
    if k.endswith(A):
        m = _module(k, A)
        a = f.get_tensor(k).astype(np.float32)
        b = f.get_tensor(k[: -len(A)] + B).astype(np.float32)
        tensors[PEFT_PREFIX + m + ".lora_A.weight"] = np.ascontiguousarray(a)
        tensors[PEFT_PREFIX + m + ".lora_B.weight"] = np.ascontiguousarray(b)
        ranks[m] = int(a.shape[0])
    elif k.endswith(DELTA):
        m = _module(k, DELTA)
        d = f.get_tensor(k).astype(np.float64)
        u, s, vt = np.linalg.svd(d, full_matrices=False)
        r = min(int(rank or 1), len(s))
        errors.append((float((s[r:] ** 2).sum()), float((s**2).sum())))
        tensors[PEFT_PREFIX + m + ".lora_A.weight"] = np.ascontiguousarray(vt[:r], np.float32)
        tensors[PEFT_PREFIX + m + ".lora_B.weight"] = np.ascontiguousarray(
            u[:, :r] * s[:r], np.float32
        )
        ranks[m] = r
    elif not k.endswith(B):
        raise CliError(f"{ADAPTER}: unexpected tensor {k}")


def _peft_config(ranks: dict[str, int]) -> JSON:
    top = max(ranks.values())
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "r": top,
        "lora_alpha": top,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "target_modules": sorted(ranks),
        # Exact module names (peft matches them as the end of a module's path).
        "rank_pattern": {m: r for m, r in sorted(ranks.items()) if r != top},
        "alpha_pattern": {m: r for m, r in sorted(ranks.items()) if r != top},
        "modules_to_save": None,
    }


def to_peft(work: Path, manifest: Manifest, out: Path, rank: int | None) -> JSON:
    from safetensors import safe_open
    from safetensors.numpy import save_file

    strategy = str(manifest.meta.get("strategy", ""))
    if strategy == "mixture":
        raise CliError(
            "a mixture composite is several adapters weighted per input, not one adapter: "
            "pull it with --format raw",
            2,
        )
    if not (work / ADAPTER).is_file():
        raise CliError(f"revision has no {ADAPTER}; pull it with --format raw", 2)
    tensors: dict[str, np.ndarray[Any, Any]] = {}
    ranks: dict[str, int] = {}
    errors: list[tuple[float, float]] = []  # (squared residual, squared norm) per dense layer
    with safe_open(str(work / ADAPTER), framework="np") as f:
        keys = sorted(f.keys())
        dense = [k for k in keys if k.endswith(DELTA)]
        if dense and not rank:
            raise CliError(
                f"strategy {strategy or 'dense'} stores full updates: pass --rank R to write a "
                "rank-R peft adapter (the error is reported), or --format raw",
                2,
            )
        for k in keys:
            _layer(f, k, rank, tensors, ranks, errors)
    if not ranks:
        raise CliError(f"{ADAPTER} holds no layers")
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    top = max(ranks.values())
    config = _peft_config(ranks)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    # The tasks' heads and summary sets travel along (peft ignores other files).
    for p in work.iterdir():
        if p.name not in (ADAPTER, "manifest.json"):
            shutil.copy2(p, out / p.name)
    report: JSON = {"strategy": strategy, "modules": len(ranks), "maxRank": top}
    if errors:
        num, den = sum(e[0] for e in errors), sum(e[1] for e in errors)
        report |= {"rank": int(rank or 0), "relativeError": (num / den) ** 0.5 if den else 0.0}
    return report
