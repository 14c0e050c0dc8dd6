"""The merge itself: module by module, streaming from the inputs to the composite file, so
that memory holds one module's tensors at a time whatever the number of layers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medforge_common.strategy import Family
from medforge_merger import strategies as st
from medforge_merger.adapters import (
    SUFFIX_A,
    SUFFIX_B,
    SUFFIX_DELTA,
    Adapter,
    StreamingWriter,
    modules_of,
)
from medforge_merger.registry import DEFAULT_REGISTRY, Registry, Strategy


def _inputs_for(
    module: str, adapters: Sequence[Adapter], weights: Sequence[float]
) -> tuple[list[Adapter], list[float]]:
    pairs = [(a, w) for a, w in zip(adapters, weights, strict=True) if module in a.shapes]
    return [a for a, _ in pairs], [w for _, w in pairs]


def layout(
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    s: Strategy,
    registry: Registry = DEFAULT_REGISTRY,
) -> list[tuple[str, tuple[int, ...]]]:
    dense = registry.family(s) is Family.DENSE
    rank_of = registry.implementation(s).rank
    out: list[tuple[str, tuple[int, ...]]] = []
    for m in modules_of(list(adapters)):
        ads, _ = _inputs_for(m, adapters, weights)
        d, _, k = ads[0].shapes[m]
        if dense:
            out.append((m + SUFFIX_DELTA, (d, k)))
            continue
        r = rank_of(s, [a.shapes[m][1] for a in ads])
        out += [(m + SUFFIX_A, (r, k)), (m + SUFFIX_B, (d, r))]
    return out


def merge_to_file(
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    s: Strategy,
    path: Path,
    registry: Registry = DEFAULT_REGISTRY,
) -> int:
    """Write the composite to `path`; returns its largest rank (0 for dense strategies)."""
    impl = registry.implementation(s)
    dense = registry.family(s) is Family.DENSE
    plan = layout(adapters, weights, s, registry)
    writer = StreamingWriter(
        path, plan, metadata={"format": "medforge-composite", "strategy": s.type}
    )
    max_rank = 0
    try:
        for m in modules_of(list(adapters)):
            ads, ws = _inputs_for(m, adapters, weights)
            factors = [a.factors(m) for a in ads]
            merged = impl.merge(factors, ws, s)
            if dense:
                writer.write(m + SUFFIX_DELTA, merged)
                continue
            f = _padded(merged, impl.rank(s, [x.rank for x in factors]))
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
