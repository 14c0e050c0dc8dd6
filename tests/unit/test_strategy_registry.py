"""One table of merge strategies (medforge_common.strategy): the CRD's enum and CEL rules say
the same, the merger has an implementation for every streamed one, and a strategy added to the
table is followed by the operator's incremental-or-full choice and the merger's dispatch."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from medforge_common import strategy
from medforge_common.strategy import STRATEGIES, Family, Traits
from medforge_merger import merge
from medforge_merger.adapters import SUFFIX_A, SUFFIX_B, load_adapter
from medforge_merger.registry import IMPLEMENTATIONS, Implementation, Registry, Strategy
from medforge_merger.strategies import Factors, MergeError
from medforge_operator import composite
from tests.merge_helpers import BASE, make_adapter

CRD = Path(__file__).resolve().parents[2] / "crds" / "compositemodels.medforge.io.yaml"

pytestmark = pytest.mark.unit


def _spec() -> dict[str, Any]:
    doc = yaml.safe_load(CRD.read_text())
    return dict(doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"])


def _rule_list(needle: str) -> list[str]:
    """The names in the CEL rule `!has(self.strategy.<needle>) || self.strategy.type in [...]`."""
    for rule in _spec()["x-kubernetes-validations"]:
        m = re.fullmatch(
            rf"!has\(self\.strategy\.{needle}\) \|\| self\.strategy\.type in \[(.*)\]", rule["rule"]
        )
        if m:
            return re.findall(r"'([a-z-]+)'", m.group(1))
    raise AssertionError(f"no CEL rule for strategy.{needle}")


def test_the_crd_enum_and_default_are_the_registry() -> None:
    t = _spec()["properties"]["strategy"]["properties"]["type"]
    assert t["enum"] == list(STRATEGIES)
    assert t["default"] == strategy.DEFAULT
    for name in STRATEGIES:
        assert name in t["description"], name


@pytest.mark.parametrize("trait", ["density", "scale", "weights"])
def test_the_crd_rules_on_optional_fields_are_the_registry(trait: str) -> None:
    assert sorted(_rule_list(trait)) == sorted(
        {
            "density": strategy.names(density=True),
            "scale": strategy.names(scale=True),
            "weights": strategy.names(weights=True),
        }[trait]
    )


def test_the_crd_rule_on_rank_is_the_registry() -> None:
    rules = [r["rule"] for r in _spec()["x-kubernetes-validations"]]
    needing = strategy.names(needs_rank=True)
    for name in needing:
        assert f"self.strategy.type != '{name}' || has(self.strategy.rank)" in rules
    assert not [
        r for r in rules if "has(self.strategy.rank)" in r and not any(n in r for n in needing)
    ]


def test_every_streamed_strategy_has_an_implementation_and_no_other() -> None:
    streamed = {n for n, t in STRATEGIES.items() if t.family is not Family.SEARCHED}
    assert set(IMPLEMENTATIONS) == streamed


def test_an_unknown_strategy_is_named() -> None:
    with pytest.raises(strategy.UnknownStrategy, match=r"strategy\.type: unknown strategy 'nope'"):
        strategy.traits("nope")
    with pytest.raises(MergeError, match="unknown strategy 'nope'"):
        Registry().family(Strategy("nope"))


def test_the_operator_follows_the_registry_for_incremental_or_full() -> None:
    for name, t in STRATEGIES.items():
        spec = {"strategy": {"type": name}, "integration": "incremental"}
        assert composite.effective_integration(spec) == ("incremental" if t.incremental else "full")
    assert composite.effective_integration({}) == "incremental"  # fusion, the default


def _halved(layers: Sequence[Factors], weights: Sequence[float], s: Strategy) -> Factors:
    """A made-up strategy: the first input at half strength, whatever the others say."""
    return Factors(layers[0].B * 0.5, layers[0].A)


def test_a_registered_strategy_is_followed_by_the_operator_and_the_merger(tmp_path: Path) -> None:
    halved = Traits("halved", Family.FACTOR, incremental=False)
    traits = strategy.extended(halved)
    assert "halved" not in STRATEGIES  # the built-in table is left as it is
    spec = {"strategy": {"type": "halved"}, "integration": "incremental"}
    assert composite.effective_integration(spec, traits) == "full"
    assert composite.effective_integration(spec) == "incremental"  # unknown to the built-in

    registry = Registry(traits, {**IMPLEMENTATIONS, "halved": Implementation(_halved)})
    adapters = []
    for i, r in enumerate([4, 8]):
        digest, _ = make_adapter(tmp_path / f"a{i}", r, i)
        adapters.append(load_adapter(tmp_path / f"a{i}", f"h/a{i}", digest, BASE))
    out = tmp_path / "halved.safetensors"
    rank = merge.merge_to_file(adapters, [1.0, 1.0], Strategy("halved"), out, registry)
    assert rank == 12  # the default rank rule: the inputs' ranks summed, padded with zeros
    got = merged_dense(out)
    first = {m: adapters[0].factors(m).dense() * 0.5 for m in adapters[0].shapes}
    for m, want in first.items():
        np.testing.assert_allclose(got[m], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(MergeError, match="unknown strategy 'halved'"):
        merge.merge_to_file(adapters, [1.0, 1.0], Strategy("halved"), out)  # built-in registry


def merged_dense(path: Path) -> dict[str, np.ndarray[Any, Any]]:
    from safetensors.numpy import load_file

    t = load_file(str(path))
    mods = {k[: -len(SUFFIX_A)] for k in t if k.endswith(SUFFIX_A)}
    return {m: t[m + SUFFIX_B] @ t[m + SUFFIX_A] for m in mods}
