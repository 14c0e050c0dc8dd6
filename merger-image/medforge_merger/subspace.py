"""The data-free subspace merges of 2024-2025, exact on the stacked LoRA factors.

Every task's update dW_i = B_i A_i lives in span(B) x span(A) of the stacked factors
B = [B_1 ... B_n] (d x R) and A = [A_1; ...; A_n] (R x k), R = sum r_i. With orthonormal bases
Q_b (d x R_b) and Q_a (k x R_a) of those spans, dW_i = Q_b C_i Q_a^T for a small core
C_i = Q_b^T B_i A_i Q_a (R_b x R_a). Every SVD below is of a core (or of cores side by side),
never of a d x k matrix, and the result goes back as factors Q_b M and Q_a^T: cost
O((d + k) R^2 + n R^3) per layer.

- iso-c (Marczak et al. 2025): the SVD of the summed update with its singular values made equal
  (their mean). Restricted to the update's own rank: the reference code averages over all
  min(d, k) singular values and keeps their (arbitrary) null directions; we keep the nonzero
  ones only, which is well defined.
- iso-cts: the summed update's top singular directions (the common subspace, a fraction of the
  joint rank) plus each task's top directions outside it, both sides orthogonalised (polar
  factor), singular values made equal (their mean). Same rank restriction.
- tsv (TSV-M, Gargiulo et al. 2025): each task's top 1/n of its own singular components, the
  concatenated bases orthogonalised (polar factor, Procrustes), singular values kept.
- knots-ties (Stoica et al. 2024): one SVD of the updates side by side, [dW_1 ... dW_n] =
  U S [V_1^T ... V_n^T]; TIES on the per-task blocks V_i; dW = U S V^T.
- core-ties (Core Space, Panariello et al. 2025): TIES on the cores C_i themselves, in the
  singular bases of the stacked B's and A's; far cheaper than KnOTS.
Each result is scaled by `scale`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medforge_merger.strategies import Array, Factors, MergeError, _check, disjoint_merge, trim

RELATIVE_TOLERANCE = 1e-10  # singular values below this fraction of the largest are zero
COMMON_FRACTION = 0.8  # iso-cts: the common subspace's share of the joint rank (the paper's)


def _projector(gram: Array) -> Array:
    """P with X P orthonormal, for X^T X = gram: an orthonormal basis of X's column span
    without forming it. Directions with eigenvalues below tolerance^2 of the largest go."""
    lam, v = np.linalg.eigh(gram)
    keep = lam > lam.max(initial=0.0) * RELATIVE_TOLERANCE**2
    out: Array = v[:, keep] / np.sqrt(lam[keep])
    return out


@dataclass(frozen=True)
class Space:
    """The joint span of the stacked factors: Q_b = xb @ pb (d x R_b), Q_a = xa.T @ pa
    (k x R_a); only the R x R transforms are kept, never the d x R bases."""

    xb: Array  # d x R, the weighted B's side by side
    xa: Array  # R x k, the A's stacked
    pb: Array  # R x R_b
    pa: Array  # R x R_a
    dtype: Any

    def zero(self) -> Array:
        return np.zeros((self.pb.shape[1], self.pa.shape[1]))

    def factors(self, core: Array) -> Factors:
        """dW = Q_b core Q_a^T as factors of rank at most min(R_b, R_a)."""
        u, s, vh = np.linalg.svd(core, full_matrices=False)
        n = max(_nonzero(s), 1)
        b = self.xb @ (self.pb @ (u[:, :n] * s[:n]))
        a = (vh[:n] @ self.pa.T) @ self.xa
        return Factors(b.astype(self.dtype), a.astype(self.dtype))


def cores(layers: Sequence[Factors], weights: Sequence[float]) -> tuple[Space, list[Array]]:
    """The joint span and the cores C_i with w_i B_i A_i = Q_b C_i Q_a^T exactly (float64):
    C_i = pb^T (X_b^T B_i)(A_i X_a^T) pa, from the column blocks of the two Gram matrices."""
    _check(layers, weights)
    xb = np.concatenate(
        [w * np.asarray(f.B, dtype=np.float64) for f, w in zip(layers, weights, strict=True)],
        axis=1,
    )
    xa = np.concatenate([np.asarray(f.A, dtype=np.float64) for f in layers], axis=0)
    gb, ga = xb.T @ xb, xa @ xa.T
    pb, pa = _projector(gb), _projector(ga)
    out, start = [], 0
    for f in layers:
        cols = slice(start, start + f.rank)
        out.append((pb.T @ gb[:, cols]) @ (ga[cols, :] @ pa))
        start += f.rank
    return Space(xb, xa, pb, pa, np.asarray(layers[0].B).dtype), out


def _nonzero(s: Array) -> int:
    return int((s > s.max(initial=0.0) * RELATIVE_TOLERANCE).sum()) if s.size else 0


def _polar(x: Array) -> Array:
    """The orthonormal factor of x (the nearest matrix with orthonormal columns)."""
    u, _, vh = np.linalg.svd(x, full_matrices=False)
    out: Array = u @ vh
    return out


def _top(
    c: Array,
    how_many: Callable[[int], int],
    us: list[Array],
    ss: list[Array],
    vs: list[Array],
) -> None:
    """Append the top singular triplets of c (how_many(its rank) of them) to us, ss, vs."""
    u, s, vh = np.linalg.svd(c, full_matrices=False)
    keep = how_many(_nonzero(s))
    us.append(u[:, :keep])
    ss.append(s[:keep])
    vs.append(vh[:keep].T)


def iso_c(layers: Sequence[Factors], weights: Sequence[float], scale: float = 1.0) -> Factors:
    space, cs = cores(layers, weights)
    u, s, vh = np.linalg.svd(sum(cs), full_matrices=False)
    n = _nonzero(s)
    core = (scale * (s[:n].mean() if n else 0.0)) * (u[:, :n] @ vh[:n])
    return space.factors(core)


def iso_cts(
    layers: Sequence[Factors],
    weights: Sequence[float],
    scale: float = 1.0,
    common_fraction: float = COMMON_FRACTION,
) -> Factors:
    space, cs = cores(layers, weights)
    total = min(space.pb.shape[1], space.pa.shape[1])  # the joint rank: where updates live
    n_tasks = len(cs)
    common = int(total * common_fraction)
    per_task = round((total - common) / n_tasks)
    common = max(total - per_task * n_tasks, 0)
    u, s, vh = np.linalg.svd(sum(cs), full_matrices=False)
    common = min(common, _nonzero(s))
    us, ss, vs = [u[:, :common]], [s[:common]], [vh[:common].T]
    uc = u[:, :common]
    for c in cs:
        # A low-rank task has no more directions than its rank.
        _top(c - uc @ (uc.T @ c), lambda n: min(per_task, n), us, ss, vs)
    sv = np.concatenate(ss)
    if not sv.size:
        return space.factors(space.zero())
    uo, vo = _polar(np.concatenate(us, axis=1)), _polar(np.concatenate(vs, axis=1))
    core = (scale * sv.mean()) * (uo @ vo.T)
    return space.factors(core)


def tsv(layers: Sequence[Factors], weights: Sequence[float], scale: float = 1.0) -> Factors:
    space, cs = cores(layers, weights)
    us: list[Array] = []
    ss: list[Array] = []
    vs: list[Array] = []
    for c in cs:
        # 1/n of the task's own components (at least one; none for a task with no update).
        _top(c, lambda n: max(1, math.floor(n / len(cs))) if n else 0, us, ss, vs)
    sv = np.concatenate(ss)
    if not sv.size:
        return space.factors(space.zero())
    uo, vo = _polar(np.concatenate(us, axis=1)), _polar(np.concatenate(vs, axis=1))
    core = scale * (uo * sv) @ vo.T
    return space.factors(core)


def knots_ties(
    layers: Sequence[Factors], weights: Sequence[float], density: float, scale: float = 1.0
) -> Factors:
    """KnOTS with TIES on the per-task blocks of V (k x rank each: never d x k)."""
    space, cs = cores(layers, weights)
    u, s, wh = np.linalg.svd(np.concatenate(cs, axis=1), full_matrices=False)
    n = _nonzero(s)
    if n == 0:
        return space.factors(space.zero())
    ra = space.pa.shape[1]
    # Task i's block of V in the layer's own input coordinates, Q_a W_i (k x n): TIES works on
    # entries, so these (never a d x k matrix) are formed, in the adapters' own precision
    # (float32 halves the largest products; float64 inputs stay float64).
    work = np.result_type(space.dtype, np.float32)
    xa_t = space.xa.T.astype(work)
    blocks = [
        xa_t @ (space.pa @ wh[:n, i * ra : (i + 1) * ra].T).astype(work) for i in range(len(cs))
    ]
    v = disjoint_merge([trim(b, density) for b in blocks], [1.0] * len(blocks))
    b = space.xb @ (space.pb @ (u[:, :n] * s[:n]))
    return Factors((scale * b).astype(space.dtype), v.T.astype(space.dtype))


def core_ties(
    layers: Sequence[Factors], weights: Sequence[float], density: float, scale: float = 1.0
) -> Factors:
    """Core Space (Panariello et al. 2025) with TIES: the bases are the singular vectors of the
    stacked B's and of the stacked A's; every task's update becomes a small core in them
    (lossless), TIES runs on the cores (R_b x R_a each), and the merged core goes back."""
    space, cs = cores(layers, weights)
    merged = disjoint_merge([trim(c, density) for c in cs], [1.0] * len(cs))
    return space.factors(scale * merged)


def merge(
    kind: str, layers: Sequence[Factors], weights: Sequence[float], scale: float, density: float
) -> Factors:
    if kind == "iso-c":
        return iso_c(layers, weights, scale)
    if kind == "iso-cts":
        return iso_cts(layers, weights, scale)
    if kind == "tsv":
        return tsv(layers, weights, scale)
    if kind == "knots-ties":
        return knots_ties(layers, weights, density, scale)
    if kind == "core-ties":
        return core_ties(layers, weights, density, scale)
    raise MergeError(f"unknown subspace strategy {kind}")
