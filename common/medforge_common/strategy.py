"""Every merge strategy's name and traits, in one table that the operator, the merger and the
CRD agree on (a unit test checks the CRD's enum and CEL rules against it). A new strategy adds
its row here, its implementation to medforge_merger.registry, and its name to the CRD enum."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType


class Family(StrEnum):
    """What a composite of the strategy holds, and so how the merger computes it."""

    FACTOR = "factor"  # low-rank factors A and B per layer, sums of the inputs' factors
    DENSE = "dense"  # a dense update per layer (TIES, DARE): never factored again
    SUBSPACE = "subspace"  # factors computed jointly from every input's SVD, data-free
    SEARCHED = "searched"  # coefficients searched on the contributions' distilled sets


@dataclass(frozen=True)
class Traits:
    name: str
    family: Family
    # The operator may merge only the new inputs into the served revision's composite (its
    # parent); otherwise every revision merges every input afresh (integration: full).
    incremental: bool
    needs_rank: bool = False  # spec.strategy.rank is required
    density: bool = False  # spec.strategy.density applies
    scale: bool = False  # spec.strategy.scale applies
    weights: bool = True  # spec.strategy.weights applies (the searched ones search their own)

    @property
    def takes_parent(self) -> bool:
        """Whether the merger reads the parent revision's composite as an input."""
        return self.incremental


def _table(*rows: Traits) -> Mapping[str, Traits]:
    return MappingProxyType({t.name: t for t in rows})


_F, _D, _S, _Q = Family.FACTOR, Family.DENSE, Family.SUBSPACE, Family.SEARCHED
STRATEGIES: Mapping[str, Traits] = _table(
    Traits("fusion", _Q, incremental=True, weights=False),
    Traits("fusion-exact", _Q, incremental=True, weights=False),
    Traits("mixture", _Q, incremental=True, weights=False),
    Traits("linear", _F, incremental=True),
    Traits("cat", _F, incremental=True),
    Traits("svd", _F, incremental=True, needs_rank=True),
    Traits("ties", _D, incremental=False, density=True),
    Traits("dare-linear", _D, incremental=False, density=True),
    Traits("dare-ties", _D, incremental=False, density=True),
    Traits("iso-c", _S, incremental=False, scale=True),
    Traits("iso-cts", _S, incremental=False, scale=True),
    Traits("tsv", _S, incremental=False, scale=True),
    Traits("knots-ties", _S, incremental=False, density=True, scale=True),
    Traits("core-ties", _S, incremental=False, density=True, scale=True),
)
DEFAULT = "fusion"


class UnknownStrategy(ValueError):
    pass


def traits(name: str, registry: Mapping[str, Traits] = STRATEGIES) -> Traits:
    try:
        return registry[name]
    except KeyError:
        raise UnknownStrategy(
            f"strategy.type: unknown strategy {name!r}; use one of {', '.join(registry)}"
        ) from None


def extended(*rows: Traits, registry: Mapping[str, Traits] = STRATEGIES) -> Mapping[str, Traits]:
    """The registry with more rows (a plugin's, a test's), the built-in one left as it is."""
    return MappingProxyType({**registry, **{t.name: t for t in rows}})


def names(registry: Mapping[str, Traits] = STRATEGIES, **trait: object) -> list[str]:
    """The strategies whose traits have these values, in table order."""
    return [n for n, t in registry.items() if all(getattr(t, k) == v for k, v in trait.items())]
