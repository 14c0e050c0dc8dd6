"""The merge itself: module by module, streaming from the inputs to the composite file, so
that memory holds one module's tensors at a time whatever the number of layers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medforge_merger import strategies as st
from medforge_merger import subspace
from medforge_merger.adapters import (
    SUFFIX_A,
    SUFFIX_B,
    SUFFIX_DELTA,
    Adapter,
    StreamingWriter,
    modules_of,
)

FACTOR = ("linear", "cat", "svd")
DENSE = ("ties", "dare-linear", "dare-ties")
SEARCHED = ("fusion", "fusion-exact", "mixture")
SUBSPACE = ("knots-ties", "iso-c", "iso-cts", "tsv", "core-ties")


@dataclass(frozen=True)
class Strategy:
    type: str
    rank: int | None = None
    density: float = 1.0
    seed: int = 0
    scale: float = 1.0  # the subspace merges' final scale


def _inputs_for(
    module: str, adapters: Sequence[Adapter], weights: Sequence[float]
) -> tuple[list[Adapter], list[float]]:
    pairs = [(a, w) for a, w in zip(adapters, weights, strict=True) if module in a.shapes]
    return [a for a, _ in pairs], [w for _, w in pairs]


def layout(
    adapters: Sequence[Adapter], weights: Sequence[float], s: Strategy
) -> list[tuple[str, tuple[int, ...]]]:
    out: list[tuple[str, tuple[int, ...]]] = []
    for m in modules_of(list(adapters)):
        ads, _ = _inputs_for(m, adapters, weights)
        d, _, k = ads[0].shapes[m]
        if s.type in DENSE:
            out.append((m + SUFFIX_DELTA, (d, k)))
            continue
        r = declared_rank(s, [a.shapes[m][1] for a in ads])
        out += [(m + SUFFIX_A, (r, k)), (m + SUFFIX_B, (d, r))]
    return out


def declared_rank(s: Strategy, ranks: Sequence[int]) -> int:
    """The rank a factor strategy writes for one layer whose inputs have these ranks."""
    total = sum(ranks)
    if s.type == "svd" and s.rank:
        return min(s.rank, total)
    if s.type == "tsv":  # 1/n of each task's components (at least one each)
        return sum(max(1, r // len(ranks)) for r in ranks)
    return total


def merge_to_file(
    adapters: Sequence[Adapter], weights: Sequence[float], s: Strategy, path: Path
) -> int:
    """Write the composite to `path`; returns its largest rank (0 for dense strategies)."""
    if s.type in SEARCHED:
        raise st.MergeError(f"strategy {s.type} is searched (medforge_merger.search), not streamed")
    if s.type == "svd" and not s.rank:
        raise st.MergeError("strategy svd needs spec.strategy.rank")
    plan = layout(adapters, weights, s)
    writer = StreamingWriter(
        path, plan, metadata={"format": "medforge-composite", "strategy": s.type}
    )
    max_rank = 0
    try:
        for m in modules_of(list(adapters)):
            ads, ws = _inputs_for(m, adapters, weights)
            factors = [a.factors(m) for a in ads]
            if s.type in DENSE:
                deltas = [f.dense() for f in factors]
                if s.type == "ties":
                    delta = st.ties(deltas, ws, s.density)
                elif s.type == "dare-linear":
                    delta = st.dare_linear(deltas, ws, s.density, s.seed)
                else:
                    delta = st.dare_ties(deltas, ws, s.density, s.seed)
                writer.write(m + SUFFIX_DELTA, delta)
                continue
            if s.type in SUBSPACE:
                merged = subspace.merge(s.type, factors, ws, s.scale, s.density)
                f = _padded(merged, declared_rank(s, [x.rank for x in factors]))
            elif s.type == "svd":
                f = st.svd(factors, ws, s.rank or 1)
            else:
                f = st.stack(factors, ws)
            max_rank = max(max_rank, f.rank)
            writer.write(m + SUFFIX_A, f.A)
            writer.write(m + SUFFIX_B, f.B)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return max_rank


def _padded(f: st.Factors, rank: int) -> st.Factors:
    """A subspace merge's factors at the rank the layout declared: zero columns of B and rows
    of A add nothing."""
    pad = rank - f.rank
    if pad <= 0:
        return f
    B = np.concatenate([f.B, np.zeros((f.B.shape[0], pad), f.B.dtype)], axis=1)
    A = np.concatenate([f.A, np.zeros((pad, f.A.shape[1]), f.A.dtype)], axis=0)
    return st.Factors(B, A)
