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

from medforge_merger.strategies import Array, Factors, _check, ties

RELATIVE_TOLERANCE = 1e-10  # singular values below this fraction of the largest are zero
GRAM_TOLERANCE = 1e-7  # knots-ties: the smallest singular value, relative, it resolves
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
        return self.product(u[:, :n] * s[:n], vh[:n].T)

    def product(self, left: Array, right: Array) -> Factors:
        """dW = Q_b left right^T Q_a^T, formed in the adapters' own precision (float32 inputs:
        the largest products in float32; float64 inputs stay float64)."""
        work = np.result_type(self.dtype, np.float32)
        b = self.xb.astype(work) @ (self.pb @ left).astype(work)
        a = (right.T @ self.pa.T).astype(work) @ self.xa.astype(work)
        return Factors(b.astype(self.dtype, copy=False), a.astype(self.dtype, copy=False))


def core_factors(
    layers: Sequence[Factors], weights: Sequence[float]
) -> tuple[Space, list[tuple[Array, Array]]]:
    """The joint span and each task's core C_i = L_i R_i as its two thin factors, with
    w_i B_i A_i = Q_b C_i Q_a^T exactly (float64): L_i = pb^T (X_b^T B_i) (R_b x r_i) and
    R_i = (A_i X_a^T) pa (r_i x R_a), from the column blocks of the two Gram matrices."""
    _check(layers, weights)
    xb = np.concatenate(
        [w * np.asarray(f.B, dtype=np.float64) for f, w in zip(layers, weights, strict=True)],
        axis=1,
    )
    xa = np.concatenate([np.asarray(f.A, dtype=np.float64) for f in layers], axis=0)
    gb, ga = xb.T @ xb, xa @ xa.T
    pb, pa = _projector(gb), _projector(ga)
    left, right = pb.T @ gb, ga @ pa
    out, start = [], 0
    for f in layers:
        cols = slice(start, start + f.rank)
        out.append((left[:, cols], right[cols, :]))
        start += f.rank
    return Space(xb, xa, pb, pa, np.asarray(layers[0].B).dtype), out


def cores(layers: Sequence[Factors], weights: Sequence[float]) -> tuple[Space, list[Array]]:
    """The joint span and the cores C_i (R_b x R_a) with w_i B_i A_i = Q_b C_i Q_a^T."""
    space, pairs = core_factors(layers, weights)
    return space, [lf @ rf for lf, rf in pairs]


def _nonzero(s: Array) -> int:
    return int((s > s.max(initial=0.0) * RELATIVE_TOLERANCE).sum()) if s.size else 0


def _polar(x: Array) -> Array:
    """The orthonormal factor of x (the nearest matrix with orthonormal columns)."""
    u, _, vh = np.linalg.svd(x, full_matrices=False)
    out: Array = u @ vh
    return out


def _top(
    left: Array,
    right: Array,
    how_many: Callable[[int], int],
    us: list[Array],
    ss: list[Array],
    vs: list[Array],
) -> None:
    """Append the top singular triplets of left @ right (how_many(its rank) of them) to us,
    ss, vs. The product has the rank r of its thin factors, so the SVD is of an r x r core
    between their QR factors, not of the R_b x R_a product."""
    ql, fl = np.linalg.qr(left)
    qr, fr = np.linalg.qr(right.T)
    u, s, vh = np.linalg.svd(fl @ fr.T)
    keep = how_many(_nonzero(s))
    us.append(ql @ u[:, :keep])
    ss.append(s[:keep])
    vs.append(qr @ vh[:keep].T)


def iso_c(layers: Sequence[Factors], weights: Sequence[float], scale: float = 1.0) -> Factors:
    space, cs = core_factors(layers, weights)
    u, s, vh = np.linalg.svd(_summed(cs), full_matrices=False)
    n = _nonzero(s)
    if n == 0:
        return space.factors(space.zero())
    return space.product(u[:, :n] * (scale * s[:n].mean()), vh[:n].T)


def _summed(cs: Sequence[tuple[Array, Array]]) -> Array:
    """sum_i L_i R_i as one product of the factors side by side."""
    out: Array = np.concatenate([lf for lf, _ in cs], axis=1) @ np.concatenate(
        [rf for _, rf in cs], axis=0
    )
    return out


def iso_cts(
    layers: Sequence[Factors],
    weights: Sequence[float],
    scale: float = 1.0,
    common_fraction: float = COMMON_FRACTION,
) -> Factors:
    space, cs = core_factors(layers, weights)
    total = min(space.pb.shape[1], space.pa.shape[1])  # the joint rank: where updates live
    n_tasks = len(cs)
    common = int(total * common_fraction)
    per_task = round((total - common) / n_tasks)
    common = max(total - per_task * n_tasks, 0)
    u, s, vh = np.linalg.svd(_summed(cs), full_matrices=False)
    common = min(common, _nonzero(s))
    us, ss, vs = [u[:, :common]], [s[:common]], [vh[:common].T]
    uc = u[:, :common]
    for lf, rf in cs:
        # What the common subspace leaves of the task: (I - U_c U_c^T) L_i R_i. A low-rank
        # task has no more directions than its rank.
        _top(lf - uc @ (uc.T @ lf), rf, lambda n: min(per_task, n), us, ss, vs)
    sv = np.concatenate(ss)
    if not sv.size:
        return space.factors(space.zero())
    uo, vo = _polar(np.concatenate(us, axis=1)), _polar(np.concatenate(vs, axis=1))
    return space.product(uo * (scale * sv.mean()), vo)


def tsv(layers: Sequence[Factors], weights: Sequence[float], scale: float = 1.0) -> Factors:
    space, cs = core_factors(layers, weights)
    us: list[Array] = []
    ss: list[Array] = []
    vs: list[Array] = []
    for lf, rf in cs:
        # 1/n of the task's own components (at least one; none for a task with no update).
        _top(lf, rf, lambda n: max(1, math.floor(n / len(cs))) if n else 0, us, ss, vs)
    sv = np.concatenate(ss)
    if not sv.size:
        return space.factors(space.zero())
    uo, vo = _polar(np.concatenate(us, axis=1)), _polar(np.concatenate(vs, axis=1))
    return space.product(uo * (scale * sv), vo)


def _row_space(c: Array) -> tuple[Array, Array, Array]:
    """U, S, W^T of a wide c (R x N, N >> R) from the eigendecomposition of the small c c^T,
    keeping singular values above GRAM_TOLERANCE of the largest: a LAPACK SVD of the R x N
    matrix costs ten times more, and below that fraction the Gram route cannot resolve a
    direction (nor can float32 adapters carry one). S is each row's norm of U^T c, W^T those
    rows normalised."""
    lam, u = np.linalg.eigh(c @ c.T)
    u = u[:, lam > lam.max(initial=0.0) * GRAM_TOLERANCE**2][:, ::-1]
    m = u.T @ c
    s = np.linalg.norm(m, axis=1)
    return u, s, m / s[:, None]


def knots_ties(
    layers: Sequence[Factors], weights: Sequence[float], density: float, scale: float = 1.0
) -> Factors:
    """KnOTS with TIES on the per-task blocks of V (k x rank each: never d x k)."""
    space, cs = cores(layers, weights)
    u, s, wh = _row_space(np.concatenate(cs, axis=1))
    n = s.shape[0]
    if n == 0:
        return space.factors(space.zero())
    ra = space.pa.shape[1]
    # Task i's block of V^T in the layer's own input coordinates, W_i Q_a^T (n x k): TIES works
    # on entries, so these (never a d x k matrix) are formed, in the adapters' own precision
    # (float32 halves the largest products; float64 inputs stay float64), as is B's side. Rows
    # of length k are what the merged A is written as: no transposed copy.
    work = np.result_type(space.dtype, np.float32)
    xa = np.concatenate([np.asarray(f.A, dtype=work) for f in layers], axis=0)
    blocks = [(wh[:, i * ra : (i + 1) * ra] @ space.pa.T).astype(work) @ xa for i in range(len(cs))]
    a = ties(blocks, [1.0] * len(blocks), density)
    b = space.xb.astype(work) @ (space.pb @ (u * (scale * s))).astype(work)
    return Factors(b.astype(space.dtype, copy=False), a.astype(space.dtype, copy=False))


def core_ties(
    layers: Sequence[Factors], weights: Sequence[float], density: float, scale: float = 1.0
) -> Factors:
    """Core Space (Panariello et al. 2025) with TIES: the bases are the singular vectors of the
    stacked B's and of the stacked A's; every task's update becomes a small core in them
    (lossless), TIES runs on the cores (R_b x R_a each), and the merged core goes back."""
    space, cs = cores(layers, weights)
    merged = ties(cs, [1.0] * len(cs), density)
    return space.factors(scale * merged)
