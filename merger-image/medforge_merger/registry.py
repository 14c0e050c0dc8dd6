"""Which function merges one layer for each streamed strategy (name to implementation), and the
rank its composite declares. The traits (family, incremental, needs a rank) live in
medforge_common.strategy; the searched strategies (fusion, fusion-exact, mixture) are computed
by medforge_merger.scoring and have no entry here."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from medforge_common.strategy import STRATEGIES, Family, Traits, UnknownStrategy
from medforge_common.strategy import traits as strategy_traits
from medforge_merger import strategies as st
from medforge_merger import subspace
from medforge_merger.strategies import Factors, MergeError


@dataclass(frozen=True)
class Strategy:
    """spec.strategy as the merger uses it."""

    type: str
    rank: int | None = None
    density: float = 1.0
    seed: int = 0
    scale: float = 1.0  # the subspace merges' final scale


Layers = Sequence[Factors]
Weights = Sequence[float]
# One layer's inputs to its merged factors (factor and subspace families) or dense update.
MergeLayer = Callable[[Layers, Weights, Strategy], Any]


def total_rank(_s: Strategy, ranks: Sequence[int]) -> int:
    return sum(ranks)


def _svd_rank(s: Strategy, ranks: Sequence[int]) -> int:
    return min(s.rank, sum(ranks)) if s.rank else sum(ranks)


def _tsv_rank(_s: Strategy, ranks: Sequence[int]) -> int:
    return sum(max(1, r // len(ranks)) for r in ranks)  # 1/n of each task's components


@dataclass(frozen=True)
class Implementation:
    merge: MergeLayer
    rank: Callable[[Strategy, Sequence[int]], int] = total_rank


def _dense(fn: Callable[[list[Any], Weights, Strategy], Any]) -> MergeLayer:
    return lambda layers, ws, s: fn([f.dense() for f in layers], ws, s)


def _svd(layers: Layers, ws: Weights, s: Strategy) -> Factors:
    if not s.rank:
        raise MergeError("strategy svd needs spec.strategy.rank")
    return st.svd(layers, ws, s.rank)


IMPLEMENTATIONS: Mapping[str, Implementation] = MappingProxyType(
    {
        "linear": Implementation(lambda fs, ws, _s: st.stack(fs, ws)),
        "cat": Implementation(lambda fs, ws, _s: st.stack(fs, ws)),
        "svd": Implementation(_svd, _svd_rank),
        "ties": Implementation(_dense(lambda ds, ws, s: st.ties(ds, ws, s.density))),
        "dare-linear": Implementation(
            _dense(lambda ds, ws, s: st.dare_linear(ds, ws, s.density, s.seed))
        ),
        "dare-ties": Implementation(
            _dense(lambda ds, ws, s: st.dare_ties(ds, ws, s.density, s.seed))
        ),
        "iso-c": Implementation(lambda fs, ws, s: subspace.iso_c(fs, ws, s.scale)),
        "iso-cts": Implementation(lambda fs, ws, s: subspace.iso_cts(fs, ws, s.scale)),
        "tsv": Implementation(lambda fs, ws, s: subspace.tsv(fs, ws, s.scale), _tsv_rank),
        "knots-ties": Implementation(
            lambda fs, ws, s: subspace.knots_ties(fs, ws, s.density, s.scale)
        ),
        "core-ties": Implementation(
            lambda fs, ws, s: subspace.core_ties(fs, ws, s.density, s.scale)
        ),
    }
)


@dataclass(frozen=True)
class Registry:
    """The traits and implementations a merge dispatches on (a test passes its own)."""

    traits: Mapping[str, Traits] = field(default_factory=lambda: STRATEGIES)
    implementations: Mapping[str, Implementation] = field(default_factory=lambda: IMPLEMENTATIONS)

    def family(self, s: Strategy) -> Family:
        try:
            return strategy_traits(s.type, self.traits).family
        except UnknownStrategy as exc:
            raise MergeError(str(exc)) from None

    def implementation(self, s: Strategy) -> Implementation:
        if self.family(s) is Family.SEARCHED:
            raise MergeError(
                f"strategy {s.type} is searched (medforge_merger.search), not streamed"
            )
        try:
            return self.implementations[s.type]
        except KeyError:
            raise MergeError(f"strategy {s.type} has no implementation in this merger") from None


DEFAULT_REGISTRY = Registry()


def merge_layer(s: Strategy, layers: Layers, weights: Weights) -> Any:
    """One layer merged by the built-in implementation of `s` (tests and benchmarks)."""
    return DEFAULT_REGISTRY.implementation(s).merge(layers, weights, s)
