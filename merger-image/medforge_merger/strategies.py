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
from typing import Any

import numpy as np

# The exact strategies run on numpy, so that a merge pod never imports torch (whose CUDA build
# alone holds about half a gigabyte of RSS); the searched strategies use the same Factors with
# torch tensors.
Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class Factors:
    """dW = B @ A, scale folded into B (numpy arrays, or torch tensors in the search)."""

    B: Any  # d x r
    A: Any  # r x k

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def dense(self) -> Any:
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
    B = np.concatenate([w * f.B for f, w in zip(layers, weights, strict=True)], axis=1)
    A = np.concatenate([f.A for f in layers], axis=0)
    return Factors(B, A)


def linear(layers: Sequence[Factors], weights: Sequence[float]) -> Factors:
    return stack(layers, weights)


def cat(layers: Sequence[Factors], weights: Sequence[float]) -> Factors:
    return stack(layers, weights)


def _orthonormal_part(x: Array) -> tuple[Array, Array]:
    """For a tall x (n x R): (P, F) with x = Q F and Q = x P orthonormal (n x R'), from the
    eigendecomposition of the small Gram matrix x^T x. Directions with eigenvalues below 1e-12
    of the largest (singular values below 1e-6 of it) are dropped: stacked adapters are often
    rank deficient (the same adapter twice, say), which a QR would carry as noise."""
    lam, v = np.linalg.eigh(x.T @ x)
    keep = lam > lam.max(initial=0.0) * 1e-12
    lam, v = lam[keep], v[:, keep]
    root = np.sqrt(lam)
    return v / root, (v * root).T


def svd(layers: Sequence[Factors], weights: Sequence[float], rank: int) -> Factors:
    """Best rank-`rank` approximation (Eckart-Young) of sum_i w_i B_i A_i.

    With B = Q_b F_b and A^T = Q_a F_a (Q orthonormal, F small), B A = Q_b (F_b F_a^T) Q_a^T, so
    the SVD of the small core C = F_b F_a^T = U S V^T gives B A = (Q_b U) S (Q_a V)^T. The Q's
    come from R x R Gram matrices in float64 (R = sum r_i), never from a d x k matrix: cost
    O((d + k) R^2 + R^3), a few GEMMs per layer.
    """
    s = stack(layers, weights)
    b64, a64 = s.B.astype(np.float64), s.A.astype(np.float64)
    r = min(rank, s.rank)  # the composite's rank, whatever the numerical rank turns out to be
    B = np.zeros((b64.shape[0], r))
    A = np.zeros((r, a64.shape[1]))
    pb, fb = _orthonormal_part(b64)
    pa, fa = _orthonormal_part(a64.T)
    if pb.shape[1] and pa.shape[1]:  # else every input is zero here
        u, sv, vh = np.linalg.svd(fb @ fa.T)
        n = min(r, int(sv.shape[0]))  # fewer when the stack is rank deficient: zeros fill up
        B[:, :n] = b64 @ (pb @ (u[:, :n] * sv[:n]))
        A[:n] = (vh[:n] @ pa.T) @ a64
    return Factors(B.astype(s.B.dtype), A.astype(s.A.dtype))


def kept_count(density: float, size: int) -> int:
    """How many entries TIES keeps: int(density x size), as peft's magnitude pruning and the
    TIES paper's code count them (never rounded up)."""
    return size if density >= 1 else int(density * size)


def trim(delta: Array, density: float) -> Array:
    """Keep the `density` fraction of entries with the largest magnitude (TIES step 1)."""
    if not 0 < density <= 1:
        raise MergeError(f"density must be in (0, 1], got {density}")
    k = kept_count(density, delta.size)
    if k >= delta.size:
        return delta.copy()
    if k == 0:
        return np.zeros_like(delta)
    magnitude = np.abs(delta)
    threshold = np.partition(magnitude.ravel(), delta.size - k)[delta.size - k]
    return np.where(magnitude >= threshold, delta, 0).astype(delta.dtype, copy=False)


def disjoint_merge(deltas: Sequence[Array], weights: Sequence[float]) -> Array:
    """TIES steps 2 and 3 in peft's convention: elect each entry's sign by the sign of the
    unweighted sum (a zero sum elects +), then average the weighted values whose own sign
    agrees over how many agree (zeros never agree)."""
    stacked = np.stack(list(deltas))
    sign = np.where(stacked.sum(axis=0) >= 0, 1.0, -1.0)
    agree = np.sign(stacked) == sign
    w = np.asarray(weights, dtype=stacked.dtype).reshape((-1,) + (1,) * (stacked.ndim - 1))
    total = (stacked * w * agree).sum(axis=0)
    count = np.maximum(agree.sum(axis=0), 1)
    out: Array = (total / count).astype(deltas[0].dtype, copy=False)
    return out


CHUNK_ENTRIES = 1 << 16  # ties works on this many entries of every delta at a time


def ties(deltas: Sequence[Array], weights: Sequence[float], density: float) -> Array:
    """TIES: `disjoint_merge` of the `trim`med deltas, without stacking them. Per entry it
    keeps the unweighted sum (whose sign is elected), the weighted sums of values and of
    magnitudes (from which those of the positive and of the negative values follow), and the
    counts of nonzero and of positive values. After each delta's threshold, the deltas are walked
    a chunk of entries at a time, so that every step's operands stay in the core's own cache
    (a third faster than whole deltas; two threads were no faster), and memory holds a few
    chunks besides the deltas, not a stack of them. The dense `ties` strategy, knots-ties (V
    blocks) and core-ties (cores) all merge with it."""
    if not 0 < density <= 1:
        raise MergeError(f"density must be in (0, 1], got {density}")
    shape, size, dtype = deltas[0].shape, deltas[0].size, deltas[0].dtype
    keep = kept_count(density, size)
    out: Array = np.zeros(shape, dtype)
    if keep == 0:
        return out
    flat = [b.reshape(size) for b in deltas]
    thresholds = _thresholds(flat, keep)
    step = min(CHUNK_ENTRIES, size)
    count = np.min_scalar_type(len(deltas))  # the narrowest integers that hold the counts
    weighted = any(w != 1.0 for w in weights)
    total, wtotal, wmagnitude, value, magnitude = (np.empty(step, dtype) for _ in range(5))
    nonzero, positives = np.empty(step, count), np.empty(step, count)
    mask = np.empty(step, bool)
    merged = out.reshape(size)
    for start in range(0, size, step):
        n = min(step, size - start)
        t, v, a = total[:n], value[:n], magnitude[:n]
        tw = wtotal[:n] if weighted else t  # with unit weights the sums are the same
        mw, nz, pos, k = wmagnitude[:n], nonzero[:n], positives[:n], mask[:n]
        for arr in (t, mw, nz, pos, *((tw,) if weighted else ())):
            arr.fill(0)
        for b, threshold, w in zip(flat, thresholds, weights, strict=True):
            chunk = b[start : start + n]
            np.abs(chunk, out=a)
            np.greater_equal(a, threshold, out=k)
            np.multiply(chunk, k, out=v)  # trimmed, unweighted: its sum elects the sign
            t += v
            # Agreement is by the unweighted value's own sign, as in peft (a zero weight still
            # counts in the mean's denominator).
            np.not_equal(v, 0, out=k)
            np.add(nz, k, out=nz, casting="unsafe")
            np.greater(v, 0, out=k)
            np.add(pos, k, out=pos, casting="unsafe")
            np.abs(v, out=a)
            if weighted:
                v *= w
                tw += v
                a *= w
            mw += a
        _elect(t, tw, mw, nz, pos, v, a, k, merged[start : start + n])
    return out


def _thresholds(flat: Sequence[Array], keep: int) -> list[Any]:
    """Each delta's magnitude threshold for keeping `keep` entries, from one partition."""
    size = flat[0].size
    ordered = np.empty(size, flat[0].dtype)
    out = []
    for b in flat:
        np.abs(b, out=ordered)
        ordered.partition(size - keep)
        out.append(ordered[size - keep])
    return out


def _elect(
    t: Array, tw: Array, mw: Array, nz: Array, pos: Array, v: Array, a: Array, k: Array, dest: Array
) -> None:
    """One chunk's result from its running sums (v, a, k are scratch): the mean of the agreeing
    weighted values under the elected sign. sum(w v) over v > 0 is (sum w v + sum w |v|) / 2;
    over v < 0, their difference / 2."""
    nz -= pos
    np.maximum(pos, 1, out=pos)
    np.maximum(nz, 1, out=nz)
    np.add(tw, mw, out=a)
    a /= pos
    np.subtract(tw, mw, out=v)
    v /= nz
    v *= 0.5
    a *= 0.5
    np.greater_equal(t, 0, out=k)  # a zero sum elects +
    a *= k
    np.less(t, 0, out=k)
    v *= k
    np.add(a, v, out=dest)


def dare(delta: Array, density: float, rng: np.random.Generator) -> Array:
    """DARE: drop each entry with probability 1 - density, rescale the rest by 1 / density."""
    if not 0 < density <= 1:
        raise MergeError(f"density must be in (0, 1], got {density}")
    keep = rng.random(delta.shape) < density
    return np.where(keep, delta / density, 0).astype(delta.dtype, copy=False)


def dare_linear(
    deltas: Sequence[Array], weights: Sequence[float], density: float, seed: int
) -> Array:
    rng = np.random.default_rng(seed)
    out = np.zeros_like(deltas[0])
    for d, w in zip(deltas, weights, strict=True):
        out += w * dare(d, density, rng)
    return out


def dare_ties(
    deltas: Sequence[Array], weights: Sequence[float], density: float, seed: int
) -> Array:
    rng = np.random.default_rng(seed)
    return disjoint_merge([dare(d, density, rng) for d in deltas], weights)
