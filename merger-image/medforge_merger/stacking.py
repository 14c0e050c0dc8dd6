"""Contributions that started from a composite revision (spec.startFrom) are merged relative to
it: their update was learnt on top of the revision's, so it is added to the composite exactly,
whatever the composite's strategy does with contributions that start from the base model.
Factor layers are stacked side by side (the rank grows by the contribution's), dense layers
(TIES, DARE) get the product added; `rank` re-compresses every layer to at most that rank by a
truncated SVD (Eckart-Young: the best approximation at that rank, stated in the manifest)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from medforge_merger import strategies as st
from medforge_merger.adapters import SUFFIX_A, SUFFIX_B, SUFFIX_DELTA, Adapter, StreamingWriter

Array = np.ndarray[Any, Any]


def _read(path: Path | None) -> dict[str, Array | st.Factors]:
    """A composite file's layers: dense updates, or factors (scale folded into B)."""
    if path is None:
        return {}
    layers: dict[str, Array | st.Factors] = {}
    with safe_open(str(path), framework="np") as f:
        keys = set(f.keys())
        for k in sorted(keys):
            if k.endswith(SUFFIX_DELTA):
                layers[k.removesuffix(SUFFIX_DELTA)] = f.get_tensor(k).astype(np.float32)
            elif k.endswith(SUFFIX_A) and k.removesuffix(SUFFIX_A) + SUFFIX_B in keys:
                m = k.removesuffix(SUFFIX_A)
                layers[m] = st.Factors(
                    f.get_tensor(m + SUFFIX_B).astype(np.float32),
                    f.get_tensor(k).astype(np.float32),
                )
    return layers


def _combined(own: Array | st.Factors | None, updates: list[st.Factors], rank: int | None) -> Any:
    """One layer: the composite's plus every update, as a dense array or factors."""
    if isinstance(own, np.ndarray):
        total = own + sum((u.dense() for u in updates), np.zeros_like(own))
        if rank is None:
            return total
        u, sv, vh = np.linalg.svd(total.astype(np.float64), full_matrices=False)
        r = min(rank, int(sv.shape[0]))
        return st.Factors((u[:, :r] * sv[:r]).astype(np.float32), vh[:r].astype(np.float32))
    layers = ([own] if own is not None else []) + updates
    if rank is not None:
        return st.svd(layers, [1.0] * len(layers), rank)
    return st.stack(layers, [1.0] * len(layers))


def stack_onto(
    composite: Path | None, relative: Sequence[Adapter], out: Path, rank: int | None = None
) -> int:
    """Write to `out` the composite's update (None: none) plus each relative input's, exactly
    (or, with `rank`, compressed to it); returns the largest rank written (0: dense only).
    `out` may be `composite` itself: it is read whole before the file is replaced."""
    layers = _read(composite)
    modules = sorted(set(layers) | {m for a in relative for m in a.shapes})
    merged: dict[str, Any] = {}
    for m in modules:
        updates = [a.factors(m) for a in relative if m in a.shapes]
        merged[m] = _combined(layers.get(m), updates, rank)
    plan: list[tuple[str, tuple[int, ...]]] = []
    for m in modules:
        v = merged[m]
        if isinstance(v, np.ndarray):
            plan.append((m + SUFFIX_DELTA, tuple(v.shape)))
        else:
            plan += [(m + SUFFIX_A, tuple(v.A.shape)), (m + SUFFIX_B, tuple(v.B.shape))]
    tmp = out.with_name(out.name + ".stacking")
    writer = StreamingWriter(
        tmp, plan, metadata={"format": "medforge-composite", "stacked": str(len(relative))}
    )
    try:
        for m in modules:
            v = merged[m]
            if isinstance(v, np.ndarray):
                writer.write(m + SUFFIX_DELTA, v)
            else:
                writer.write(m + SUFFIX_A, v.A)
                writer.write(m + SUFFIX_B, v.B)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    tmp.replace(out)
    return max((v.rank for v in merged.values() if isinstance(v, st.Factors)), default=0)
