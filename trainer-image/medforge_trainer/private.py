"""Differentially private training (DP-SGD through Opacus): per-image gradients of the LoRA
factors and the head, each clipped to `maxGradNorm`, Gaussian noise added, batches drawn by
Poisson sampling; the accountant tracks the (epsilon, delta) spent and training stops before a
step would spend more than the run was granted.

The guarantee is per image (each image is one record), not per patient: a patient with several
images in the set is protected at a proportionally weaker level. docs/privacy.md says so."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from medforge_trainer.config import PrivacySettings, TrainingSettings
from medforge_trainer.dataset import Split
from medforge_trainer.errors import TrainFailed
from medforge_trainer.train import Normalize, Runtime

JSON = dict[str, Any]
DEFAULT_BATCH = 32


class PrivacyRefused(TrainFailed):
    """The run cannot give the guarantee it was asked for (the message says which field)."""


def check_delta(privacy: PrivacySettings, n: int) -> None:
    """delta must be below 1/N: at 1/N a mechanism may publish one record outright."""
    if n <= 0 or privacy.delta >= 1.0 / n:
        raise PrivacyRefused(
            f"privacy.delta: {privacy.delta:g} is not below 1/N = {1.0 / max(n, 1):.3g} for the "
            f"{n} training images; choose delta < 1/N (1e-5 or smaller is usual)"
        )


@dataclass
class Engine:
    """Opacus's pieces for one run."""

    module: Any  # GradSampleModule around the model
    optimizer: Any  # DPOptimizer
    loader: Any  # DPDataLoader (Poisson sampling)
    engine: Any  # PrivacyEngine (its accountant)


def make_private(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    settings: TrainingSettings,
    privacy: PrivacySettings,
    noise_multiplier: float | None = None,
    poisson: bool = True,
) -> Engine:
    """Wrap the model, an optimiser over its trainable parameters and a loader. The noise
    multiplier is the one that spends `privacy.epsilon` over `settings.epochs` (or the one
    given: the tests take 0 to compare with a plain step)."""
    from opacus import PrivacyEngine

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    batch = min(settings.batch_size or DEFAULT_BATCH, len(labels))
    gen = torch.Generator().manual_seed(settings.seed)
    data = torch.utils.data.TensorDataset(images, labels)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, generator=gen, shuffle=not poisson)
    engine = PrivacyEngine(accountant=privacy.accountant)
    common: JSON = {
        "module": model,
        "optimizer": opt,
        "data_loader": loader,
        "max_grad_norm": privacy.max_grad_norm,
        "poisson_sampling": poisson,
    }
    if noise_multiplier is None:
        try:
            module, optimizer, dl = engine.make_private_with_epsilon(
                **common,
                target_epsilon=privacy.epsilon,
                target_delta=privacy.delta,
                epochs=settings.epochs,
            )
        except ValueError as exc:  # no noise multiplier reaches the target
            raise PrivacyRefused(
                f"privacy.epsilon: {privacy.epsilon:g} is too small for {settings.epochs} "
                f"epoch(s) over {len(labels)} images in batches of {batch} ({exc}); raise "
                "epsilon, or lower training.epochs"
            ) from exc
    else:
        module, optimizer, dl = engine.make_private(**common, noise_multiplier=noise_multiplier)
    return Engine(module, optimizer, dl, engine)


def spend(e: Engine, delta: float, steps: int) -> float:
    """The epsilon of `steps` DP-SGD steps at this run's noise multiplier and sample rate, by
    the run's accountant. Every batch drawn counts, an empty one too (conservative)."""
    if steps == 0:
        return 0.0
    acc = copy.deepcopy(e.engine.accountant)
    acc.history = [(e.optimizer.noise_multiplier, e.loader.sample_rate, steps)]
    return float(acc.get_epsilon(delta))


def allowed_steps(e: Engine, privacy: PrivacySettings, planned: int) -> int:
    """The most steps whose spend stays within the grant (the accountant's epsilon grows with
    the steps; the noise multiplier was solved for `planned` steps only up to a tolerance)."""
    if planned == 0 or spend(e, privacy.delta, planned) <= privacy.epsilon:
        return planned
    lo, hi = 0, planned  # within at lo, beyond at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if spend(e, privacy.delta, mid) <= privacy.epsilon else (lo, mid)
    return lo


def report(e: Engine, privacy: PrivacySettings, steps: int, stopped_early: bool) -> JSON:
    """The manifest's `privacy` section: informational (a tenant can write its manifest); the
    operator's ledger holds what was granted."""
    import opacus

    return {
        "epsilon": round(spend(e, privacy.delta, steps), 6),
        "epsilonGranted": privacy.epsilon,
        "delta": privacy.delta,
        "noiseMultiplier": round(float(e.optimizer.noise_multiplier), 6),
        "sampleRate": round(float(e.loader.sample_rate), 8),
        "steps": steps,
        "maxGradNorm": privacy.max_grad_norm,
        "accountant": privacy.accountant,
        "library": f"opacus {opacus.__version__}",
        "history": [[float(e.optimizer.noise_multiplier), float(e.loader.sample_rate), steps]],
        "stoppedEarly": stopped_early,
        "unit": "image",
    }


def train_private(
    model: nn.Module,
    data: Split,
    settings: TrainingSettings,
    privacy: PrivacySettings,
    rt: Runtime,
    norm: Normalize,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, float], JSON]:
    """DP-SGD in fp32 (no autocast, no compilation: Opacus hooks the eager modules). Returns the
    training figures and the privacy report."""
    n = len(data.labels)
    check_delta(privacy, n)
    e = make_private(model, data.images, data.labels, settings, privacy)
    loss_fn = nn.CrossEntropyLoss()
    log(
        f"differential privacy: epsilon {privacy.epsilon:g}, delta {privacy.delta:g}, "
        f"noise multiplier {e.optimizer.noise_multiplier:.3f}, sample rate "
        f"{e.loader.sample_rate:.4f}, clipping at {privacy.max_grad_norm:g}"
    )
    e.module.train()
    t0 = time.perf_counter()
    # Every batch drawn is a step the accountant counts (Poisson sampling: len(loader) a epoch).
    allowed = allowed_steps(e, privacy, settings.epochs * len(e.loader))
    drawn = steps = seen = 0
    stopped = False
    last = float("nan")
    for epoch in range(1, settings.epochs + 1):
        for x, y in e.loader:
            if drawn >= allowed:
                stopped = True
                break
            drawn += 1
            e.optimizer.zero_grad(set_to_none=True)
            if len(y) == 0:
                continue  # an empty Poisson batch: nothing to learn from, counted as a step
            logits = e.module(norm(x.to(rt.device)))
            loss = loss_fn(logits.float(), y.to(rt.device))
            loss.backward()
            e.optimizer.step()
            steps, seen, last = steps + 1, seen + len(y), float(loss.detach())
        log(f"epoch {epoch}/{settings.epochs} steps {steps} loss {last:.4f}")
        if stopped:
            log("the run's privacy budget is spent: training stops here")
            break
    out = report(e, privacy, drawn, stopped)
    e.module._close()  # removes Opacus's hooks; the model's parameters were trained in place
    model.eval()
    if not math.isfinite(last):
        raise TrainFailed("differentially private training took no step: the set is too small")
    seconds = time.perf_counter() - t0
    stats = {
        "seconds": seconds,
        "imagesPerSecond": seen / seconds if seconds > 0 else 0.0,
        "imagesPerSecondAfterFirstEpoch": float("nan"),
        "secondsToFirstStep": float("nan"),
        "batchSize": float(e.loader.batch_sampler.sample_rate * n),  # the expected batch
        "loss": last,
    }
    return stats, out
