"""The classifier around a frozen base model, shared by training and scoring.

Heads:
- `clip-prompt` (as in MedForge): the image embedding against the text embeddings of the class
  names ("a photo of <class>"); the text tower runs once, frozen, and is not adapted.
- `linear`: a linear layer on the pooled image features of a vision backbone (ViT and the like).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medforge_ml.errors import ModelError

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
        raise ModelError(f"base model cannot be loaded ({exc})".splitlines()[0]) from exc
    tokenizer = None
    if config.model_type == "clip":
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(directory))
        except (OSError, ValueError) as exc:
            raise ModelError(
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
            raise ModelError(
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
                raise ModelError(
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
            raise ModelError("base model: cannot tell its feature size (config.hidden_size)")
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
