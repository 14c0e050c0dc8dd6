"""The subspace merges, exact on factors, against dense float64 references of the published
formulas (restricted to the updates' own rank), on layers of mixed ranks."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from medforge_merger import subspace
from medforge_merger.registry import Strategy, merge_layer
from medforge_merger.strategies import Factors, disjoint_merge, trim

D, K = 14, 11
RANKS = (2, 3, 4)
WEIGHTS = (1.0, 0.5, 2.0)


def layers(seed: int = 0) -> list[Factors]:
    rng = np.random.default_rng(seed)
    return [Factors(rng.normal(size=(D, r)), rng.normal(size=(r, K))) for r in RANKS]


def dense(fs: list[Factors]) -> list[np.ndarray]:
    return [w * (f.B @ f.A) for f, w in zip(fs, WEIGHTS, strict=True)]


def nonzero(s: np.ndarray) -> int:
    return int((s > s.max() * 1e-10).sum())


def polar(x: np.ndarray) -> Any:
    u, _, vh = np.linalg.svd(x, full_matrices=False)
    return u @ vh


def iso_c_ref(deltas: list[np.ndarray]) -> Any:
    u, s, vh = np.linalg.svd(sum(deltas), full_matrices=False)
    n = nonzero(s)
    return s[:n].mean() * u[:, :n] @ vh[:n]


def iso_cts_ref(deltas: list[np.ndarray], fraction: float = 0.8) -> Any:
    total = min(
        nonzero(np.linalg.svd(np.concatenate(deltas, axis=1), compute_uv=False)),
        nonzero(np.linalg.svd(np.concatenate(deltas, axis=0), compute_uv=False)),
    )
    per_task = round((total - int(total * fraction)) / len(deltas))
    common = total - per_task * len(deltas)
    u, s, vh = np.linalg.svd(sum(deltas), full_matrices=False)
    us, ss, vs = [u[:, :common]], [s[:common]], [vh[:common].T]
    for d in deltas:
        ut, st, vt = np.linalg.svd(d - u[:, :common] @ u[:, :common].T @ d, full_matrices=False)
        keep = min(per_task, nonzero(st))
        us.append(ut[:, :keep])
        ss.append(st[:keep])
        vs.append(vt[:keep].T)
    sv = np.concatenate(ss)
    return sv.mean() * polar(np.concatenate(us, axis=1)) @ polar(np.concatenate(vs, axis=1)).T


def tsv_ref(deltas: list[np.ndarray]) -> Any:
    us, ss, vs = [], [], []
    for d in deltas:
        u, s, vh = np.linalg.svd(d, full_matrices=False)
        keep = max(1, math.floor(nonzero(s) / len(deltas)))
        us.append(u[:, :keep])
        ss.append(s[:keep])
        vs.append(vh[:keep].T)
    uo, vo = polar(np.concatenate(us, axis=1)), polar(np.concatenate(vs, axis=1))
    return (uo * np.concatenate(ss)) @ vo.T


def knots_ref(deltas: list[np.ndarray], density: float) -> Any:
    u, s, vh = np.linalg.svd(np.concatenate(deltas, axis=1), full_matrices=False)
    n = nonzero(s)
    blocks = [vh[:n, i * K : (i + 1) * K].T for i in range(len(deltas))]
    v = disjoint_merge([trim(b, density) for b in blocks], [1.0] * len(blocks))
    return (u[:, :n] * s[:n]) @ v.T


def core_ties_ref(fs: list[Factors], deltas: list[np.ndarray], density: float) -> Any:
    """Core Space: left singular vectors of the stacked B's and of the stacked A^T's, each
    update projected to its core, TIES on the cores, back."""
    ub = np.linalg.svd(
        np.concatenate([w * f.B for f, w in zip(fs, WEIGHTS, strict=True)], 1), full_matrices=False
    )[0]
    ua = np.linalg.svd(np.concatenate([f.A for f in fs], 0).T, full_matrices=False)[0]
    cs = [ub.T @ d @ ua for d in deltas]
    return ub @ disjoint_merge([trim(c, density) for c in cs], [1.0] * len(cs)) @ ua.T


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_strategy_equals_its_dense_reference(seed: int) -> None:
    fs = layers(seed)
    deltas = dense(fs)
    cases = {
        "iso-c": iso_c_ref(deltas),
        "iso-cts": iso_cts_ref(deltas),
        "tsv": tsv_ref(deltas),
        "knots-ties": knots_ref(deltas, 0.5),
        "core-ties": core_ties_ref(fs, deltas, 0.5),
    }
    for kind, want in cases.items():
        got = merge_layer(Strategy(kind, density=0.5, scale=1.0), fs, WEIGHTS)
        assert np.allclose(got.B @ got.A, want, atol=1e-9), kind
        # Never more than the joint rank: no direction outside the adapters' own spans.
        assert got.rank <= sum(RANKS)
        scaled = merge_layer(Strategy(kind, density=0.5, scale=0.5), fs, WEIGHTS)
        assert np.allclose(scaled.B @ scaled.A, 0.5 * want, atol=1e-9), kind


def test_iso_c_differs_from_the_reference_code_on_a_low_rank_sum_and_is_well_defined() -> None:
    """The reference code averages over all min(d, k) singular values, zeros included, and keeps
    their arbitrary null directions: on a rank-9 sum of a 14 x 11 layer it returns a full-rank
    matrix. Ours keeps the sum's own 9 directions."""
    deltas = dense(layers())
    u, s, vh = np.linalg.svd(sum(deltas), full_matrices=False)
    full = s.mean() * u @ vh
    ours = subspace.iso_c(layers(), WEIGHTS)
    assert np.linalg.matrix_rank(full) == min(D, K)
    assert np.linalg.matrix_rank(ours.B @ ours.A) == sum(RANKS)
    assert not np.allclose(full, ours.B @ ours.A)


def test_iso_c_singular_values_are_equal_and_tsv_keeps_a_share_of_each_task() -> None:
    iso = subspace.iso_c(layers(), WEIGHTS)
    s = np.linalg.svd(iso.B @ iso.A, compute_uv=False)
    n = nonzero(s)
    assert n == sum(RANKS) and np.allclose(s[:n], s[0])
    t = subspace.tsv(layers(), WEIGHTS)
    # floor(r_i / 3) components each, at least one: 1 + 1 + 1.
    assert nonzero(np.linalg.svd(t.B @ t.A, compute_uv=False)) == 3


def test_the_same_adapter_twice_and_zero_layers_are_handled() -> None:
    f = layers()[0]
    twice = subspace.iso_c([f, f], [1.0, 1.0])
    assert np.linalg.matrix_rank(twice.B @ twice.A) == RANKS[0]
    zero = Factors(np.zeros((D, 2)), np.zeros((2, K)))
    for kind in ("iso-c", "iso-cts", "tsv", "knots-ties", "core-ties"):
        got = merge_layer(Strategy(kind, density=0.5, scale=1.0), [f, zero], [1.0, 1.0])
        assert np.isfinite(got.B).all() and np.isfinite(got.A).all(), kind
    # An empty task adds nothing to TSV: the other task's own share, as if alone.
    alone = subspace.tsv([f], [1.0])
    with_zero = subspace.tsv([f, zero], [1.0, 1.0])
    u, s, vh = np.linalg.svd(f.B @ f.A, full_matrices=False)
    assert np.allclose(with_zero.B @ with_zero.A, s[0] * np.outer(u[:, 0], vh[0]), atol=1e-9)
    assert np.allclose(alone.B @ alone.A, f.B @ f.A, atol=1e-9)
