"""The training loop and the evaluation on the validation split."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from medforge_ml.metrics import classification_metrics
from medforge_trainer.config import TrainingSettings
from medforge_trainer.dataset import Split

Normalize = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Runtime:
    device: torch.device
    autocast_dtype: torch.dtype | None  # bf16 on CUDA; None = full precision

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def pick_runtime(precision: str) -> Runtime:
    """CUDA with bf16 autocast when present (unless fp32 is asked), else the CPU in fp32."""
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        bf16 = precision in ("auto", "bf16") and torch.cuda.is_bf16_supported()
        return Runtime(dev, torch.bfloat16 if bf16 else None)
    return Runtime(torch.device("cpu"), None)


def normalizer(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> Normalize:
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
    s = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255

    def apply(batch: torch.Tensor) -> torch.Tensor:
        return (batch.to(device, non_blocking=True).float() - m) / s

    return apply


def batches(n: int, size: int, gen: torch.Generator | None) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    for i in range(0, n, size):
        yield order[i : i + size]


def fmt_eta(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def train(
    model: nn.Module,
    data: Split,
    settings: TrainingSettings,
    rt: Runtime,
    norm: Normalize,
    log: Callable[[str], None] = print,
    log_every: int = 10,
) -> dict[str, float]:
    """Cross-entropy on the logits (softmax is inside the loss, never before it)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(settings.seed)
    n = len(data.labels)
    steps_per_epoch = math.ceil(n / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    step = 0
    seen = 0
    start = time.perf_counter()
    running = torch.zeros((), device=rt.device)
    last_loss = float("nan")
    model.train()
    for epoch in range(1, settings.epochs + 1):
        for idx in batches(n, settings.batch_size, gen):
            x = norm(data.images[idx])
            y = data.labels[idx].to(rt.device, non_blocking=True)
            with rt.autocast():
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += loss.detach()
            step += 1
            seen += len(idx)
            if step % log_every == 0 or step == total:
                # The only host sync: every log_every steps.
                last_loss = float(running) / (
                    log_every if step % log_every == 0 else step % log_every
                )
                running.zero_()
                elapsed = time.perf_counter() - start
                rate = seen / elapsed
                log(
                    f"epoch {epoch}/{settings.epochs} step {step}/{total} loss {last_loss:.4f} "
                    f"{rate:.1f} img/s eta {fmt_eta((total - step) * elapsed / step)}"
                )
    elapsed = time.perf_counter() - start
    model.eval()
    return {
        "seconds": elapsed,
        "imagesPerSecond": seen / elapsed if elapsed else 0.0,
        "loss": last_loss,
    }


@torch.no_grad()
def predict(
    model: nn.Module, images: torch.Tensor, rt: Runtime, norm: Normalize, batch: int = 64
) -> torch.Tensor:
    """Class probabilities (n x classes) in float32 on the CPU."""
    was_training = model.training
    model.eval()
    out = []
    for idx in batches(len(images), batch, None):
        with rt.autocast():
            logits = model(norm(images[idx]))
        out.append(torch.softmax(logits.float(), dim=-1).cpu())
    model.train(was_training)
    return torch.cat(out)


def evaluate(model: nn.Module, data: Split, rt: Runtime, norm: Normalize) -> dict[str, float | int]:
    return classification_metrics(data.labels, predict(model, data.images, rt, norm))
