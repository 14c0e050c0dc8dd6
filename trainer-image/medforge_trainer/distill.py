"""Distribution matching in pixel space (as in MedForge's distilled summary sets).

Per class, synthetic images are optimised so that the mean of their frozen image features matches
the mean over a batch of real images of that class, with the same random differentiable
augmentation applied to both sides in each iteration. The images start from noise rather than
from patients' images, so no real image is copied into the summary set."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from medforge_trainer.config import DistillSettings
from medforge_trainer.dataset import Split
from medforge_trainer.train import Feeder, Runtime

Features = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Augment:
    """One draw of augmentation parameters, applied identically to real and synthetic images."""

    flip: bool
    scale: float
    angle: float
    shift: tuple[float, float]
    brightness: float
    contrast: float

    @classmethod
    def draw(cls, gen: torch.Generator) -> Augment:
        u = torch.rand(7, generator=gen).tolist()
        return cls(
            flip=u[0] < 0.5,
            scale=0.8 + 0.4 * u[1],
            angle=(u[2] - 0.5) * math.radians(30),
            shift=((u[3] - 0.5) * 0.25, (u[4] - 0.5) * 0.25),
            brightness=(u[5] - 0.5) * 0.4,
            contrast=0.8 + 0.4 * u[6],
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        cos, sin = math.cos(self.angle) / self.scale, math.sin(self.angle) / self.scale
        sx = -cos if self.flip else cos
        theta = torch.tensor(
            [[sx, -sin, self.shift[0]], [sin if not self.flip else -sin, cos, self.shift[1]]],
            dtype=x.dtype,
            device=x.device,
        )
        grid = nn.functional.affine_grid(
            theta.expand(len(x), 2, 3), list(x.shape), align_corners=False
        )
        x = nn.functional.grid_sample(x, grid, padding_mode="reflection", align_corners=False)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * self.contrast + mean + self.brightness


def distill(
    features: Features,
    data: Split,
    num_classes: int,
    settings: DistillSettings,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    seed: int,
    rt: Runtime,
    log: Callable[[str], None] = print,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """(images in normalised pixel space, n x 3 x H x W float32; labels int64; figures). On the
    training's runtime: its device, its autocast for the frozen features, the same feeder of
    real images (on the GPU when they fit there)."""
    device = rt.device
    ipc = settings.images_per_class
    gen = torch.Generator().manual_seed(seed)
    shape = data.images.shape[1:]
    syn = torch.randn((num_classes * ipc, *shape), generator=gen).to(device).requires_grad_(True)
    labels = torch.arange(num_classes).repeat_interleave(ipc)
    opt = torch.optim.SGD([syn], lr=settings.learning_rate, momentum=0.5)
    by_class = [torch.nonzero(data.labels == c).flatten() for c in range(num_classes)]
    feed = Feeder(data, rt, settings.real_batch)
    every = max(1, settings.iterations // 10)
    seen = 0
    start = time.perf_counter()
    for it in range(1, settings.iterations + 1):
        loss: torch.Tensor = torch.zeros((), device=device)
        for c in range(num_classes):
            pool = by_class[c]
            if len(pool) == 0:
                continue
            pick = pool[torch.randperm(len(pool), generator=gen)[: settings.real_batch]]
            aug = Augment.draw(gen)
            with torch.no_grad(), rt.autocast():
                real = features(aug(normalize(feed(pick)[0]))).float().mean(dim=0)
            with rt.autocast():
                fake = features(aug(syn[c * ipc : (c + 1) * ipc])).float().mean(dim=0)
            diff: torch.Tensor = ((real - fake) ** 2).sum()
            loss = loss + diff
            seen += len(pick) + ipc
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        loss = loss.detach()
        if it % every == 0 or it == settings.iterations:
            log(f"distill iteration {it}/{settings.iterations} loss {loss.item():.5f}")
    seconds = time.perf_counter() - start
    figures = {"seconds": seconds, "imagesPerSecond": seen / seconds if seconds else 0.0}
    log(
        f"distilled {len(labels)} images in {seconds:.1f} s ({figures['imagesPerSecond']:.0f} img/s)"
    )
    return syn.detach().float().cpu(), labels, figures
