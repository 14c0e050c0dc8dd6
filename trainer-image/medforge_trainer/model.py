"""The classifier around a frozen base model, and its LoRA adapter.

Heads:
- `clip-prompt` (as in MedForge): the image embedding against the text embeddings of the class
  names ("a photo of <class>"); the text tower runs once, frozen, and is not adapted.
- `linear`: a linear layer on the pooled image features of a vision backbone (ViT and the like).

Adapter keys are peft's (`<module>.lora_A.weight`, `<module>.lora_B.weight`) with module names as
in the base model (`vision_model.encoder.layers.0.self_attn.q_proj`), which is what the merger reads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medforge_trainer.config import LoraSettings
from medforge_trainer.errors import TrainFailed

ADAPTER_NAME = "default"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROMPT = "a photo of {}"


def load_base(directory: Path) -> tuple[nn.Module, Any, dict[str, Any]]:
    """(model, tokenizer or None, config dict) from a save_pretrained directory, safetensors only."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # progress lines on stdout are ours
    # Load reports list unused heads (a ViT's pooler) as missing: noise for a frozen backbone.
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    try:
        config = AutoConfig.from_pretrained(str(directory))
        model_cls: Any = CLIPModel if config.model_type == "clip" else AutoModel
        model = model_cls.from_pretrained(str(directory), use_safetensors=True)
    except (OSError, ValueError, KeyError) as exc:
        raise TrainFailed(f"base model cannot be loaded ({exc})".splitlines()[0]) from exc
    tokenizer = None
    if config.model_type == "clip":
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(directory))
        except (OSError, ValueError) as exc:
            raise TrainFailed(
                f"base model: the CLIP tokenizer cannot be loaded ({exc})".splitlines()[0]
            ) from exc
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer, config.to_dict()


def image_settings(
    directory: Path, config: dict[str, Any]
) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """Input size and normalisation, from preprocessor_config.json when the model has one."""
    vision = config.get("vision_config") or config
    size = int(vision.get("image_size") or 224)
    mean, std = (
        (CLIP_MEAN, CLIP_STD) if config.get("model_type") == "clip" else ((0.5,) * 3, (0.5,) * 3)
    )
    pre = directory / "preprocessor_config.json"
    if pre.is_file():
        try:
            data = json.loads(pre.read_text())
        except ValueError as exc:
            raise TrainFailed(
                f"base model preprocessor_config.json is not valid JSON ({exc})"
            ) from exc
        mean = tuple(data.get("image_mean") or mean)
        std = tuple(data.get("image_std") or std)
    return size, mean, std


class Classifier(nn.Module):
    """Images in (normalised pixels), class logits out."""

    def __init__(
        self, base: Any, head: str, classes: tuple[str, ...], tokenizer: Any = None
    ) -> None:
        super().__init__()
        self.head_type = head
        self.is_clip = hasattr(base, "vision_model") and hasattr(base, "visual_projection")
        if self.is_clip:
            # Same attribute names as CLIPModel: adapter keys match the base model's modules.
            self.vision_model: Any = base.vision_model
            self.visual_projection: Any = base.visual_projection
            self.prefix = ""
        else:
            self.backbone: Any = base
            self.prefix = "backbone."
        if head == "clip-prompt":
            if not self.is_clip or tokenizer is None:
                raise TrainFailed(
                    "task.head: clip-prompt needs a CLIP base model with its tokenizer; "
                    "use head: linear for a vision-only backbone"
                )
            text = tokenizer([PROMPT.format(c) for c in classes], padding=True, return_tensors="pt")
            with torch.no_grad():
                pooled = base.text_model(**text).pooler_output
                feats = nn.functional.normalize(base.text_projection(pooled), dim=-1)
            self.register_buffer("text_features", feats)
            self.logit_scale = float(base.logit_scale.exp().clamp(max=100))
        else:
            with torch.no_grad():
                dim = self._dim(base)
            self.head = nn.Linear(dim, len(classes))

    def _dim(self, base: Any) -> int:
        if self.is_clip:
            return int(self.visual_projection.out_features)
        cfg = getattr(base, "config", None)
        size = int(getattr(cfg, "hidden_size", 0) or 0)
        if not size:
            raise TrainFailed("base model: cannot tell its feature size (config.hidden_size)")
        return size

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.is_clip:
            pooled = self.vision_model(pixel_values=pixels).pooler_output
            feats = self.visual_projection(pooled)
            return (
                nn.functional.normalize(feats, dim=-1) if self.head_type == "clip-prompt" else feats
            )
        out = self.backbone(pixel_values=pixels)
        hidden: torch.Tensor = out.last_hidden_state
        if hidden.ndim == 3:  # transformer tokens: the class token
            return hidden[:, 0]
        pooled_out: torch.Tensor = out.pooler_output
        return pooled_out.flatten(1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        feats = self.features(pixels)
        if self.head_type == "clip-prompt":
            text: torch.Tensor = self.text_features  # type: ignore[assignment]
            return self.logit_scale * feats @ text.to(feats.dtype).T
        out: torch.Tensor = self.head(feats)
        return out


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
