"""Merge math on one adapted layer at a time.

An adapter's update of a layer is dW = s * B @ A (B: d x r, A: r x k, s = alpha / r). We fold
the scale into B, so a layer is a pair (B, A) with dW = B @ A. Exact strategies work on these
factors and never form a d x k matrix unless the strategy itself is dense (TIES, DARE):

- linear: task arithmetic, sum_i w_i B_i A_i, kept exactly as stacked factors;
- cat: the same stacked factors (rank sum r_i); peft's "cat" is this with w_i folded into B;
- svd: the best rank-r approximation of sum_i w_i B_i A_i, from QR factorisations of the stacked
  factors and an SVD of the small (sum r_i)^2 core;
- ties, dare-linear, dare-ties: on dense dW, as their papers define them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class Factors:
    """dW = B @ A, scale folded into B."""

    B: Tensor  # d x r
    A: Tensor  # r x k

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def dense(self) -> Tensor:
        return self.B @ self.A


class MergeError(ValueError):
    pass


def _check(layers: Sequence[Factors], weights: Sequence[float]) -> None:
    if not layers:
        raise MergeError("no adapters to merge")
    if len(layers) != len(weights):
        raise MergeError(f"{len(layers)} adapters but {len(weights)} weights")
    d, k = layers[0].B.shape[0], layers[0].A.shape[1]
    for i, f in enumerate(layers):
        if f.B.shape[0] != d or f.A.shape[1] != k or f.B.shape[1] != f.A.shape[0]:
            raise MergeError(
                f"adapter {i}: factor shapes {tuple(f.B.shape)} x {tuple(f.A.shape)} do not "
                f"fit a {d} x {k} layer"
            )


def stack(layers: Sequence[Factors], weights: Sequence[float]) -> Factors:
    """sum_i w_i B_i A_i as one pair of stacked factors (exact; rank sum r_i)."""
    _check(layers, weights)
    B = torch.cat([w * f.B for f, w in zip(layers, weights, strict=True)], dim=1)
    A = torch.cat([f.A for f in layers], dim=0)
    return Factors(B, A)


def linear(layers: Sequence[Factors], weights: Sequence[float]) -> Factors:
    return stack(layers, weights)


def cat(layers: Sequence[Factors], weights: Sequence[float]) -> Factors:
    return stack(layers, weights)


def svd(layers: Sequence[Factors], weights: Sequence[float], rank: int) -> Factors:
    """Best rank-`rank` approximation (Eckart-Young) of sum_i w_i B_i A_i.

    With B = Q_b R_b and A^T = Q_a R_a, B A = Q_b (R_b R_a^T) Q_a^T, so the SVD of the small core
    C = R_b R_a^T = U S V^T gives B A = (Q_b U) S (Q_a V)^T: cost O((d + k) R^2 + R^3), R = sum r_i.
    """
    s = stack(layers, weights)
    work = torch.float64 if s.B.dtype == torch.float64 else torch.float32
    qb, rb = torch.linalg.qr(s.B.to(work))
    qa, ra = torch.linalg.qr(s.A.to(work).T)
    u, sv, vh = torch.linalg.svd(rb @ ra.T)
    r = min(rank, int(sv.shape[0]))
    B = (qb @ u[:, :r]) * sv[:r]
    A = vh[:r] @ qa.T
    return Factors(B.to(s.B.dtype), A.to(s.A.dtype))


def trim(delta: Tensor, density: float) -> Tensor:
    """Keep the `density` fraction of entries with the largest magnitude (TIES step 1)."""
    if not 0 < density <= 1:
        raise MergeError(f"density must be in (0, 1], got {density}")
    k = round(density * delta.numel())
    if k >= delta.numel():
        return delta.clone()
    if k == 0:
        return torch.zeros_like(delta)
    flat = delta.abs().flatten()
    threshold = torch.topk(flat, k, sorted=True).values[-1]
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def disjoint_merge(deltas: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """TIES steps 2 and 3: elect each entry's sign by the sign of the weighted sum, then average
    the weighted values that agree with it (entries that disagree or are zero do not count)."""
    stacked = torch.stack([w * t for t, w in zip(deltas, weights, strict=True)])
    sign = torch.sign(stacked.sum(dim=0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    total = (stacked * agree).sum(dim=0)
    count = agree.sum(dim=0).clamp(min=1)
    return total / count


def ties(deltas: Sequence[Tensor], weights: Sequence[float], density: float) -> Tensor:
    return disjoint_merge([trim(d, density) for d in deltas], weights)


def dare(delta: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE: drop each entry with probability 1 - density, rescale the rest by 1 / density."""
    if not 0 < density <= 1:
        raise MergeError(f"density must be in (0, 1], got {density}")
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float64) < density
    return torch.where(keep, delta / density, torch.zeros_like(delta))


def dare_linear(
    deltas: Sequence[Tensor], weights: Sequence[float], density: float, seed: int
) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return sum(
        (w * dare(d, density, g) for d, w in zip(deltas, weights, strict=True)),
        torch.zeros_like(deltas[0]),
    )


def dare_ties(
    deltas: Sequence[Tensor], weights: Sequence[float], density: float, seed: int
) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return disjoint_merge([dare(d, density, g) for d in deltas], weights)
