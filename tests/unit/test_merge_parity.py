"""Parity with peft's own merge functions (peft.utils.merge_utils) on the same dense updates:
task arithmetic (linear), magnitude pruning (TIES' trim), TIES and DARE (with DARE's random
mask fixed on both sides). Our convention is peft's: TIES keeps int(density x n) entries,
elects each entry's sign on the unweighted trimmed sum, and averages the weighted values that
agree over their count (docs/merger.md)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from peft.utils import merge_utils as peft

from medforge_merger import strategies as st

pytestmark = [pytest.mark.unit, pytest.mark.filterwarnings("ignore:The density .* no pruning")]

Array = np.ndarray[Any, Any]
WEIGHTS = {
    "unit": [1.0, 1.0, 1.0, 1.0],
    "mixed": [0.5, 2.0, 1.0, 0.25],
    "negative and zero": [1.5, -1.0, 0.0, 0.7],
}


def deltas(shape: tuple[int, ...] = (24, 17), n: int = 4, seed: int = 3) -> list[Array]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) for _ in range(n)]


def theirs(fn: Any, ds: list[Array], weights: list[float], *args: Any) -> Array:
    out = fn([torch.from_numpy(d) for d in ds], torch.tensor(weights, dtype=torch.float64), *args)
    result: Array = out.numpy()
    return result


@pytest.mark.parametrize("weights", WEIGHTS.values(), ids=WEIGHTS.keys())
def test_linear_is_peft_task_arithmetic(weights: list[float]) -> None:
    rng = np.random.default_rng(1)
    layers = [
        st.Factors(rng.standard_normal((24, 4)), rng.standard_normal((4, 17))) for _ in range(4)
    ]
    ours = st.linear(layers, weights).dense()
    want = theirs(peft.task_arithmetic, [f.dense() for f in layers], weights)
    np.testing.assert_allclose(ours, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("density", [1.0, 0.7, 0.5, 0.3, 0.1, 0.01])
def test_trim_is_peft_magnitude_pruning(density: float) -> None:
    """Including densities whose kept count is not whole (0.3 x 408 = 122.4 keeps 122)."""
    for d in deltas(n=2):
        want = peft.prune(torch.from_numpy(d), density, method="magnitude").numpy()
        got = st.trim(d, density)
        np.testing.assert_array_equal(got, want)
        assert np.count_nonzero(got) == st.kept_count(density, d.size)


@pytest.mark.parametrize("density", [1.0, 0.5, 0.3, 0.05])
@pytest.mark.parametrize("weights", WEIGHTS.values(), ids=WEIGHTS.keys())
def test_ties_is_peft_ties(density: float, weights: list[float]) -> None:
    ds = deltas()
    want = theirs(peft.ties, ds, weights, density)
    np.testing.assert_allclose(st.ties(ds, weights, density), want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        st.disjoint_merge([st.trim(d, density) for d in ds], weights), want, rtol=1e-10, atol=1e-12
    )


def test_ties_float32_chunks_agree_with_peft(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunked walk, a chunk smaller than a row, in float32 as adapters are stored."""
    monkeypatch.setattr(st, "CHUNK_ENTRIES", 7)
    ds = [d.astype(np.float32) for d in deltas((40, 12), 5, 9)]
    weights = [0.5, -1.0, 2.0, 1.0, 0.0]
    want = theirs(peft.ties, [d.astype(np.float64) for d in ds], weights, 0.4)
    np.testing.assert_allclose(st.ties(ds, weights, 0.4), want, rtol=1e-5, atol=1e-6)


class FixedMasks:
    """Stands in for numpy's Generator in st.dare: `random` gives 0 where the mask keeps an
    entry and 1 where it drops one, so `random() < density` is the mask."""

    def __init__(self, masks: list[Array]) -> None:
        self.masks: Iterator[Array] = iter(masks)

    def random(self, shape: tuple[int, ...]) -> Array:
        m = next(self.masks)
        assert m.shape == shape
        return np.where(m, 0.0, 1.0)


@pytest.mark.parametrize("weights", WEIGHTS.values(), ids=WEIGHTS.keys())
@pytest.mark.parametrize("kind", ["dare_linear", "dare_ties"])
def test_dare_with_a_fixed_mask_is_peft_dare(
    kind: str, weights: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    ds, density = deltas(), 0.4
    rng = np.random.default_rng(11)
    masks: list[Array] = [np.less(rng.random(d.shape), density) for d in ds]
    torch_masks = iter([torch.from_numpy(m.astype(np.float64)) for m in masks])
    monkeypatch.setattr(torch, "bernoulli", lambda _p: next(torch_masks))
    want = theirs(getattr(peft, kind), ds, weights, density)
    monkeypatch.setattr(np.random, "default_rng", lambda _seed: FixedMasks(masks))
    got = getattr(st, kind)(ds, weights, density, 0)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
