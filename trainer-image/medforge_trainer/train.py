"""The training loop and the evaluation on the validation split."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from medforge_ml.metrics import classification_metrics
from medforge_trainer.config import TrainingSettings
from medforge_trainer.dataset import CHUNK, Split

Normalize = Callable[[torch.Tensor], torch.Tensor]


CPU_BATCH = 32  # batchSize unset on a CPU
GPU_BATCHES = (512, 256, 128, 64, 32, 16, 8)  # batchSize unset on a GPU: the largest that fits
DEVICE_DATA_SHARE = 0.4  # the decoded images move onto the GPU when they take at most this share
# of its free memory; else they stay in pinned host memory and each batch is copied asynchronously


@dataclass
class Runtime:
    device: torch.device
    autocast_dtype: torch.dtype | None  # bf16 on CUDA; None = full precision
    compile: bool = False  # torch.compile the model (training.compile; auto: on a GPU only)

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def describe(self) -> str:
        precision = f"{self.autocast_dtype} autocast" if self.autocast_dtype else "fp32"
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return f"{name}, {precision}" + (", torch.compile" if self.compile else "")


def pick_runtime(precision: str, compile_setting: str = "auto") -> Runtime:
    """CUDA with bf16 autocast when present (unless fp32 is asked), else the CPU in fp32.
    torch.compile on a GPU unless turned off; on a CPU only when asked (its compile time is
    rarely won back in a job of minutes)."""
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        bf16 = precision in ("auto", "bf16") and torch.cuda.is_bf16_supported()
        return Runtime(dev, torch.bfloat16 if bf16 else None, compile_setting != "never")
    return Runtime(torch.device("cpu"), None, compile_setting == "always")


def normalizer(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> Normalize:
    """uint8 images to the model's input, on the device (the copy is 4x smaller than floats)."""
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
    s = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255

    def apply(batch: torch.Tensor) -> torch.Tensor:
        return (batch.to(device, non_blocking=True).float() - m) / s

    return apply


def batches(
    n: int, size: int, gen: torch.Generator | None, chunk: int | None = None
) -> Iterator[torch.Tensor]:
    """Index batches: in order without a generator; shuffled with one. With `chunk` (images on
    disk) the chunks come in random order and are shuffled within, so that reading stays
    local: a chunk is read once per epoch instead of every batch touching the whole file."""
    if gen is None:
        order = torch.arange(n)
    elif chunk is None or n <= chunk:
        order = torch.randperm(n, generator=gen)
    else:
        starts = (torch.randperm(math.ceil(n / chunk), generator=gen) * chunk).tolist()
        order = torch.cat([s + torch.randperm(min(chunk, n - s), generator=gen) for s in starts])
    for i in range(0, n, size):
        yield order[i : i + size]


class Feeder:
    """Batches of (uint8 images, labels) on the device. On a GPU the whole split moves there
    when it fits (one copy, then no transfer per step); otherwise each batch is gathered into
    one of two pinned buffers and copied without blocking, the next batch's gather overlapping
    the last copy. Images that live on disk (a split larger than memory) are never pinned
    whole: only the batch is."""

    def __init__(self, data: Split, rt: Runtime, batch: int) -> None:
        self.rt = rt
        self.images, self.labels = data.images, data.labels
        self.resident = False
        self._buffers: list[torch.Tensor] = []
        self._copied: list[torch.cuda.Event | None] = []
        if rt.device.type != "cuda":
            return
        free, _total = torch.cuda.mem_get_info(rt.device)
        if self.images.numel() <= DEVICE_DATA_SHARE * free:
            self.images = self.images.to(rt.device)
            self.labels = self.labels.to(rt.device)
            self.resident = True
            return
        shape = (batch, *self.images.shape[1:])
        self._buffers = [torch.empty(shape, dtype=torch.uint8).pin_memory() for _ in range(2)]
        self._copied = [None, None]
        self._next = 0

    def __call__(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.rt.device
        if self.resident:
            idx = idx.to(dev, non_blocking=True)
            return self.images[idx], self.labels[idx]
        if not self._buffers:
            return self.images[idx], self.labels[idx].to(dev, non_blocking=True)
        slot = self._next
        self._next = 1 - slot
        done = self._copied[slot]
        if done is not None:
            done.synchronize()  # the copy from two batches ago, long finished
        buffer = self._buffers[slot][: len(idx)]
        torch.index_select(self.images, 0, idx, out=buffer)
        x = buffer.to(dev, non_blocking=True)
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record()
        self._copied[slot] = event
        return x, self.labels[idx].to(dev, non_blocking=True)


def optimizer(params: list[nn.Parameter], settings: TrainingSettings, rt: Runtime) -> Any:
    """AdamW; its fused kernel on a GPU (one launch for all parameters)."""
    fused = rt.device.type == "cuda"
    return torch.optim.AdamW(
        params, lr=settings.learning_rate, weight_decay=settings.weight_decay, fused=fused or None
    )


def pick_batch_size(
    model: nn.Module, data: Split, settings: TrainingSettings, rt: Runtime, norm: Normalize
) -> int:
    """The configured batch size; unset: 32 on a CPU, on a GPU the largest of GPU_BATCHES (up to
    the split's size) for which a forward and backward pass fits in its memory."""
    if settings.batch_size is not None:
        return settings.batch_size
    if rt.device.type != "cuda":
        return CPU_BATCH
    n = len(data.labels)
    loss_fn = nn.CrossEntropyLoss()
    for size in GPU_BATCHES:
        if size > n and size != GPU_BATCHES[-1]:
            continue
        idx = torch.arange(min(size, n)).repeat(math.ceil(size / n))[:size]
        try:
            with rt.autocast():
                logits = model(norm(data.images[idx]))
            loss_fn(logits.float(), data.labels[idx].to(rt.device)).backward()
            return size
        except torch.OutOfMemoryError:
            pass
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    return GPU_BATCHES[-1]


def fmt_eta(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def compiled(model: nn.Module, rt: Runtime, log: Callable[[str], None]) -> nn.Module:
    """torch.compile'd when the runtime asks (compilation itself happens at the first step)."""
    if not rt.compile:
        return model
    try:
        out: nn.Module = torch.compile(model)  # type: ignore[assignment]
        return out
    except Exception as exc:  # an unsupported platform: train without it
        log(f"torch.compile unavailable ({type(exc).__name__}: {exc}); training without it")
        return model


class Stepper:
    """One optimisation step, on the compiled model when the runtime asks for it; a compilation
    that fails (at the first step, where it happens) leaves the eager model training."""

    def __init__(
        self,
        model: nn.Module,
        opt: Any,
        rt: Runtime,
        norm: Normalize,
        log: Callable[[str], None],
        penalty: Callable[[], torch.Tensor] | None = None,
    ) -> None:
        self.model, self.opt, self.rt, self.norm, self.log = model, opt, rt, norm, log
        self.forward = compiled(model, rt, log)
        self.loss_fn = nn.CrossEntropyLoss()
        self.first = True
        self.penalty = penalty

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.rt.autocast():
            logits = self.forward(self.norm(x))
        loss: torch.Tensor = self.loss_fn(logits.float(), y)
        if self.penalty is not None:
            loss = loss + self.penalty()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        self.opt.step()
        return loss.detach()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.first or self.forward is self.model:
            return self._step(x, y)
        self.first = False
        try:
            return self._step(x, y)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:
            self.log(f"torch.compile failed ({type(exc).__name__}); training without it")
            self.forward = self.model
            return self._step(x, y)


class Progress:
    """Steps, images, the loss (read from the device every log_every steps only), the time to
    the first step and the steady-state throughput after the first epoch."""

    def __init__(
        self,
        rt: Runtime,
        settings: TrainingSettings,
        total: int,
        log: Callable[[str], None],
        log_every: int,
        started: float | None,
    ) -> None:
        self.rt, self.settings, self.total, self.log, self.every = (
            rt,
            settings,
            total,
            log,
            log_every,
        )
        self.started = started
        self.step = self.seen = 0
        self.first_step = float("nan")
        self.running = torch.zeros((), device=rt.device)
        self.last_loss = float("nan")
        self.epoch_one = (0.0, 0)
        self.start = time.perf_counter()

    def _sync(self) -> None:
        if self.rt.device.type == "cuda":
            torch.cuda.synchronize()

    def stepped(self, loss: torch.Tensor, images: int, epoch: int) -> None:
        self.running += loss
        self.step += 1
        self.seen += images
        if self.step == 1 and self.started is not None:
            self.first_step = time.perf_counter() - self.started
        if self.step % self.every == 0 or self.step == self.total:
            # The only host sync: every log_every steps.
            count = self.every if self.step % self.every == 0 else self.step % self.every
            self.last_loss = float(self.running) / count
            self.running.zero_()
            elapsed = time.perf_counter() - self.start
            self.log(
                f"epoch {epoch}/{self.settings.epochs} step {self.step}/{self.total} "
                f"loss {self.last_loss:.4f} {self.seen / elapsed:.1f} img/s "
                f"eta {fmt_eta((self.total - self.step) * elapsed / self.step)}"
            )

    def epoch_done(self, epoch: int) -> None:
        if epoch == 1:
            self._sync()
            self.epoch_one = (time.perf_counter() - self.start, self.seen)

    def stats(self, batch: int) -> dict[str, float]:
        self._sync()
        elapsed = time.perf_counter() - self.start
        seconds, images = elapsed - self.epoch_one[0], self.seen - self.epoch_one[1]
        return {
            "seconds": elapsed,
            "imagesPerSecond": self.seen / elapsed if elapsed else 0.0,
            # Steady state: the epochs after the first (compilation and warm-up are in it).
            "imagesPerSecondAfterFirstEpoch": images / seconds if seconds > 0 else float("nan"),
            "secondsToFirstStep": self.first_step,
            "batchSize": float(batch),
            "loss": self.last_loss,
        }


def proximal(model: nn.Module, mu: float, scale: float) -> Callable[[], torch.Tensor] | None:
    """FedProx's term over the adapter: (mu / 2) * sum over adapted layers of
    ||scale * B A||_F^2, the squared distance in weight space from where training started
    (a fresh LoRA adds nothing at first). None when mu is 0."""
    if mu <= 0:
        return None
    params = dict(model.named_parameters())
    pairs = [
        (p, params[n.replace(".lora_A.", ".lora_B.")]) for n, p in params.items() if ".lora_A." in n
    ]

    def term() -> torch.Tensor:
        total = sum(((b @ a) ** 2).sum() for a, b in pairs)
        return (mu / 2) * scale**2 * torch.as_tensor(total)

    return term


def train(
    model: nn.Module,
    data: Split,
    settings: TrainingSettings,
    rt: Runtime,
    norm: Normalize,
    log: Callable[[str], None] = print,
    log_every: int = 10,
    started: float | None = None,
    lora_scale: float = 1.0,
) -> dict[str, float]:
    """Cross-entropy on the logits (softmax is inside the loss, never before it), plus
    FedProx's term when settings.proximal_mu is set (`lora_scale`: alpha / rank). `started`
    (time.perf_counter()) is when the job began, for the time to the first step."""
    params = [p for p in model.parameters() if p.requires_grad]
    batch = pick_batch_size(model, data, settings, rt, norm)
    feed = Feeder(data, rt, batch)
    penalty = proximal(model, settings.proximal_mu, lora_scale)
    step = Stepper(model, optimizer(params, settings, rt), rt, norm, log, penalty)
    gen = torch.Generator().manual_seed(settings.seed)
    n = len(data.labels)
    progress = Progress(
        rt, settings, math.ceil(n / batch) * settings.epochs, log, log_every, started
    )
    model.train()
    chunk = CHUNK if data.on_disk else None
    for epoch in range(1, settings.epochs + 1):
        for idx in batches(n, batch, gen, chunk):
            progress.stepped(step(*feed(idx)), len(idx), epoch)
        progress.epoch_done(epoch)
    out = progress.stats(batch)
    model.eval()
    return out


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
