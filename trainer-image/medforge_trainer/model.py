"""The LoRA adapter on the shared classifier (medforge_ml.classifier): which layers get it, and
its tensors in and out.

Adapter keys are peft's (`<module>.lora_A.weight`, `<module>.lora_B.weight`) with module names as
in the base model (`vision_model.encoder.layers.0.self_attn.q_proj`), which is what the merger reads.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from medforge_ml.classifier import ADAPTER_NAME, Classifier, image_settings, load_base
from medforge_trainer.config import LoraSettings
from medforge_trainer.errors import TrainFailed

# The classifier lives in the shared package; the trainer's steps use it through this module.
__all__ = [
    "ADAPTER_NAME",
    "Classifier",
    "adapter_state",
    "add_lora",
    "head_state",
    "image_settings",
    "load_adapter_state",
    "load_base",
    "target_pattern",
]


def target_pattern(model: Classifier, targets: tuple[str, ...]) -> str:
    """A regex over module names (peft full-matches it) that selects the targets inside the image
    path only: the frozen text tower and the linear head are never adapted."""
    names = "|".join(re.escape(t) for t in targets)
    scope = r"(vision_model\.(.*\.)?|)" if model.is_clip else r"backbone\.(.*\.)?"
    pattern = f"{scope}({names})"
    # Linear layers only: the merger combines 2-D factors (a convolution's would be 4-D).
    linear = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    matched = [n for n in linear if re.fullmatch(pattern, n)]
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in matched):
            candidates = sorted({n.rsplit(".", 1)[-1] for n in linear if not n.startswith("head")})
            raise TrainFailed(
                f"lora.targetModules: {t!r} matches no linear layer of the image model; "
                f"its layers are named {', '.join(candidates[:12])}"
            )
    return pattern


def add_lora(model: Classifier, lora: LoraSettings) -> Classifier:
    # Imported here: the merger scores composites with this module and never needs peft.
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft annotates int, takes floats
        lora_dropout=lora.dropout,
        target_modules=target_pattern(model, lora.target_modules),
        bias="none",
    )
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or name.startswith("head."))
    return model


def _public(name: str, prefix: str) -> str:
    return name.removeprefix(prefix).replace(f".{ADAPTER_NAME}.weight", ".weight")


def adapter_state(model: Classifier) -> dict[str, torch.Tensor]:
    """LoRA tensors only, keyed by the base model's module names."""
    out = {
        _public(n, model.prefix): p.detach().to("cpu", torch.float32).contiguous()
        for n, p in model.named_parameters()
        if ".lora_A." in n or ".lora_B." in n
    }
    if not out:
        raise TrainFailed("internal: the model holds no LoRA tensors")
    return out


def head_state(model: Classifier) -> dict[str, torch.Tensor]:
    if model.head_type != "linear":
        return {}
    return {
        f"head.{k}": v.detach().cpu().float().contiguous()
        for k, v in model.head.state_dict().items()
    }


def load_adapter_state(
    model: Classifier, adapter: dict[str, torch.Tensor], head: dict[str, torch.Tensor]
) -> None:
    """Put saved LoRA (and head) tensors back into a model that has the same adapter layout."""
    params = dict(model.named_parameters())
    expected = {_public(n, model.prefix): n for n in params if ".lora_A." in n or ".lora_B." in n}
    if set(expected) != set(adapter):
        missing = sorted(set(expected) - set(adapter))[:3]
        extra = sorted(set(adapter) - set(expected))[:3]
        raise TrainFailed(f"adapter does not fit the model: missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for key, name in expected.items():
            params[name].copy_(adapter[key])
        if head:
            model.head.load_state_dict({k.removeprefix("head."): v for k, v in head.items()})
