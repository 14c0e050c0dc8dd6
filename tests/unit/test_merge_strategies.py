"""Exact merge strategies against a dense float64 reference, TIES and DARE against their
papers' definitions on small hand-checked tensors, and `cat` against peft."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from medforge_merger import strategies as st

D, K = 48, 40


def adapters(ranks: list[int], seed: int = 0) -> list[st.Factors]:
    rng = np.random.default_rng(seed)
    return [st.Factors(rng.standard_normal((D, r)), rng.standard_normal((r, K))) for r in ranks]


def rel(a: Any, b: Any) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


RANKS = [4, 8, 16]
WEIGHTS = [0.5, -1.25, 2.0]


def reference() -> Any:
    return sum(w * f.B @ f.A for f, w in zip(adapters(RANKS), WEIGHTS, strict=True))


@pytest.mark.parametrize("merge", [st.linear, st.cat])
def test_linear_and_cat_are_exact_for_mixed_ranks(merge: object) -> None:
    out = merge(adapters(RANKS), WEIGHTS)  # type: ignore[operator]
    assert out.rank == sum(RANKS)
    assert rel(out.dense(), reference()) < 1e-12


@pytest.mark.parametrize("rank", [1, 5, 12, 28])
def test_svd_equals_the_truncated_dense_svd(rank: int) -> None:
    out = st.svd(adapters(RANKS), WEIGHTS, rank)
    u, s, vh = np.linalg.svd(reference())
    truncated = (u[:, :rank] * s[:rank]) @ vh[:rank]
    assert out.rank == rank
    assert rel(out.dense(), truncated) < 1e-5
    # Eckart-Young: the error is exactly the discarded singular values.
    err = np.linalg.norm(reference() - out.dense())
    assert float(err) == pytest.approx(float(np.linalg.norm(s[rank:])), rel=1e-6)


def test_svd_of_a_rank_deficient_stack_keeps_its_rank_and_is_exact() -> None:
    one = adapters([6])
    out = st.svd(one + one, [1.0, 1.0], 12)  # the same adapter twice: numerical rank 6
    assert out.rank == 12 and np.isfinite(out.B).all() and np.isfinite(out.A).all()
    assert rel(out.dense(), 2 * one[0].dense()) < 1e-10
    zero = st.svd([st.Factors(np.zeros((D, 3)), np.zeros((3, K)))], [1.0], 2)
    assert zero.rank == 2 and not zero.dense().any()


def test_svd_of_full_rank_is_exact() -> None:
    out = st.svd(adapters(RANKS), WEIGHTS, sum(RANKS))
    assert rel(out.dense(), reference()) < 1e-10


def test_shape_mismatch_names_the_adapter() -> None:
    bad = [*adapters([4]), st.Factors(np.zeros((D + 1, 4)), np.zeros((4, K)))]
    with pytest.raises(st.MergeError, match="adapter 1"):
        st.linear(bad, [1, 1])


def test_ties_by_hand() -> None:
    # Two tasks; density 0.5 keeps the two largest magnitudes of each.
    t1 = np.array([[3.0, -1.0], [0.5, 2.0]])
    t2 = np.array([[-1.5, -4.0], [1.0, -0.2]])
    assert np.array_equal(st.trim(t1, 0.5), [[3.0, 0.0], [0.0, 2.0]])
    assert np.array_equal(st.trim(t2, 0.5), [[-1.5, -4.0], [0.0, 0.0]])
    # Signs elected by the sum of the trimmed values: [[+, -], [0, +]];
    # mean over the values that agree: [[3, -4], [0, 2]].
    out = st.ties([t1, t2], [1.0, 1.0], 0.5)
    assert np.array_equal(out, [[3.0, -4.0], [0.0, 2.0]])


def test_ties_averages_agreeing_values() -> None:
    t1 = np.array([2.0, 1.0, -3.0])
    t2 = np.array([4.0, -5.0, -1.0])
    out = st.ties([t1, t2], [1.0, 1.0], 1.0)
    # entry 0: both +, mean 3; entry 1: sum -4 elects -, only t2 agrees: -5; entry 2: mean -2
    assert np.array_equal(out, [3.0, -5.0, -2.0])


def test_dare_drops_and_rescales_with_a_seed() -> None:
    delta = np.ones((200, 200))
    g = np.random.default_rng(7)
    out = st.dare(delta, 0.3, g)
    kept = out != 0
    assert np.allclose(out[kept], 1 / 0.3)
    assert abs(float(kept.mean()) - 0.3) < 0.02  # Bernoulli(0.3) mask
    again = st.dare(delta, 0.3, np.random.default_rng(7))
    assert np.array_equal(out, again)  # the seed makes it reproducible
    assert np.array_equal(st.dare(delta, 1.0, g), delta)
    # dare-linear is the weighted sum of the dropped-and-rescaled deltas, in expectation the
    # plain weighted sum.
    a, b = np.ones((300, 300)), 2 * np.ones((300, 300))
    merged = st.dare_linear([a, b], [0.5, 0.25], 0.5, seed=3)
    assert abs(float(merged.mean()) - 1.0) < 0.02


def test_cat_matches_peft_add_weighted_adapter() -> None:
    import peft
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(K, D, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)  # type: ignore[no-any-return]

    torch.manual_seed(0)
    model: Any = peft.get_peft_model(
        Net(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]), adapter_name="first"
    )
    model.add_adapter("second", peft.LoraConfig(r=8, lora_alpha=4, target_modules=["proj"]))
    layer: Any = model.base_model.model.proj
    ours = []
    for name in ("first", "second"):
        torch.nn.init.normal_(layer.lora_B[name].weight)  # peft starts B at zero
        ours.append(
            st.Factors(
                layer.lora_B[name].weight.detach().double().numpy() * layer.scaling[name],
                layer.lora_A[name].weight.detach().double().numpy(),
            )
        )
    weights = [0.7, 1.3]
    model.add_weighted_adapter(["first", "second"], weights, "merged", combination_type="cat")
    theirs = (
        layer.lora_B["merged"].weight @ layer.lora_A["merged"].weight
    ).detach().double().numpy() * layer.scaling["merged"]
    assert rel(st.cat(ours, weights).dense(), theirs) < 1e-5


@pytest.mark.parametrize("density", [1.0, 0.5, 0.2, 0.01, 1e-9])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("chunk", [7, 1 << 16])
@pytest.mark.parametrize("weights", [[1.0] * 5, [0.5, -1.0, 2.0, 1.0, 0.0]])
def test_ties_equals_trim_and_disjoint_merge(
    density: float, dtype: Any, chunk: int, weights: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chunked TIES (dense ties, knots-ties' V blocks, core-ties' cores) gives what the plain
    trim + disjoint_merge give, with ties at the threshold, exact zeros, entries where the
    deltas' signs cancel and negative or zero weights, whatever the chunk."""
    monkeypatch.setattr(st, "CHUNK_ENTRIES", chunk)
    rng = np.random.default_rng(7)
    # Multiples of 1/8: sums are exact in any order, so a cancellation is exactly zero.
    blocks = [(rng.standard_normal((40, 12)) * 8).round().astype(dtype) / 8 for _ in range(5)]
    blocks[1][:3] = 0.0
    blocks[2][5] = -blocks[3][5]
    blocks[4][7] = 0.0
    blocks[4][7, :4] = 0.25
    want = st.disjoint_merge([st.trim(b, density) for b in blocks], weights)
    got = st.ties(blocks, weights, density)
    assert got.dtype == dtype
    assert np.allclose(got, want, atol=1e-6 if dtype == np.float32 else 1e-12)
