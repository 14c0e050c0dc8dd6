"""The privacy ledger without a cluster: which budgets cover a dataset, reservations composed by
summing, refusals that say what is left, idempotent re-admission of the same generation, and a
composite's spec.privacy.maxEpsilon read from the granted figures only."""

from __future__ import annotations

from typing import Any

from medforge_common.api import InputReason, Reason
from medforge_operator import composite, privacy_ledger
from tests.unit.test_composite_logic import BASE, comp, contribution

JSON = dict[str, Any]


def budget(
    name: str = "b", uri: str = "s3://data/x/", eps: float = 5.0, delta: float = 1e-4
) -> JSON:
    return {
        "metadata": {"name": name, "namespace": "h", "generation": 1, "resourceVersion": "1"},
        "spec": {"dataset": {"uri": uri}, "epsilon": eps, "delta": delta},
        "status": {},
    }


def lorac(name: str, eps: float | None, gen: int = 1, uri: str = "s3://data/x") -> JSON:
    spec: JSON = {"dataset": {"uri": uri}}
    if eps is not None:
        spec["privacy"] = {"epsilon": eps, "delta": 1e-5}
    return {
        "metadata": {"name": name, "namespace": "h", "uid": f"u-{name}", "generation": gen},
        "spec": spec,
    }


def reserve(b: JSON, c: JSON, at: str = "t") -> privacy_ledger.Admission:
    a = privacy_ledger.admit(c, [b], at)
    for budget_, status in a.reserve:
        budget_["status"] = status
    return a


def test_reservations_add_up_and_stop_at_the_total() -> None:
    b = budget()
    first = reserve(b, lorac("a", 3.0))
    assert first.admitted and first.grant is not None
    assert first.grant["epsilon"] == 3.0 and first.grant["budgets"] == ["b"]
    assert b["status"]["spent"] == {"epsilon": 3.0, "delta": 1e-5}
    assert b["status"]["remaining"]["epsilon"] == 2.0
    # The same generation again (a round cut short after reserving): nothing more is spent.
    again = reserve(b, lorac("a", 3.0))
    assert again.admitted and again.reserve == [] and b["status"]["spent"]["epsilon"] == 3.0
    second = reserve(b, lorac("c", 3.0))
    assert not second.admitted and second.refusal is not None
    assert second.refusal[0] == Reason.PRIVACY_BUDGET_EXCEEDED
    assert "epsilon 2 " in second.refusal[1] and "spec.privacy" in second.refusal[1]
    assert b["status"]["refused"][0] == {"contribution": "c", "epsilon": 3.0, "at": "t"}
    # Refused again on the next resync: the refusal is not written twice.
    assert privacy_ledger.admit(lorac("c", 3.0), [b], "t2").reserve == []
    # A new generation (a retrain) is a new run: it spends again.
    assert reserve(b, lorac("a", 2.0, gen=2)).admitted
    assert b["status"]["remaining"]["epsilon"] == 0.0 and len(b["status"]["entries"]) == 2


def test_a_dataset_under_a_budget_needs_differential_privacy() -> None:
    b = budget()
    a = reserve(b, lorac("plain", None))
    assert not a.admitted and a.refusal is not None and a.refusal[0] == Reason.PRIVACY_REQUIRED
    assert "s3://data/x" in a.refusal[1]
    # Another dataset is not covered: no budget, no refusal; DP without a budget is granted.
    assert privacy_ledger.admit(lorac("other", None, uri="s3://data/y/"), [b], "t").admitted
    free = privacy_ledger.admit(lorac("free", 8.0, uri="s3://data/y/"), [b], "t")
    assert free.admitted and free.grant is not None and free.grant["budgets"] == []


def test_delta_counts_too() -> None:
    b = budget(delta=1.5e-5)
    assert reserve(b, lorac("a", 1.0)).admitted
    refused = reserve(b, lorac("c", 1.0))
    assert not refused.admitted and "delta" in (refused.refusal or ("", ""))[1]


def test_a_composite_requires_a_granted_epsilon_no_larger_than_its_bound() -> None:
    digest = "sha256:" + "1" * 64
    strong, weak, none = (contribution(n, d, f"t{i}") for i, (n, d) in enumerate(
        [("strong", digest), ("weak", "sha256:" + "2" * 64), ("none", "sha256:" + "3" * 64)]
    ))  # fmt: skip
    strong["status"]["privacy"] = {"epsilon": 1.0, "delta": 1e-5, "generation": 1}
    weak["status"]["privacy"] = {"epsilon": 8.0, "delta": 1e-5, "generation": 1}
    # A grant for an older generation says nothing about this artifact.
    none["status"]["privacy"] = {"epsilon": 1.0, "delta": 1e-5, "generation": 0}
    obj = comp(privacy={"maxEpsilon": 3})
    inputs, candidates = composite.evaluate_inputs(obj, [strong, weak, none], BASE.digest)
    reasons = {i["name"]: i["reason"] for i in inputs}
    assert reasons["weak"] == reasons["none"] == InputReason.PRIVACY_BUDGET_TOO_LARGE
    assert [c["metadata"]["name"] for c in candidates] == ["strong"]
    plan = composite.Plan(1, candidates, candidates)
    from medforge_common.uris import S3Uri

    cfg = composite.merge_plan(obj, plan, BASE, S3Uri("forge", "composites/x/"), "forge")
    assert cfg["inputs"][0]["privacy"] == {"epsilon": 1.0, "delta": 1e-5}
    # Without the requirement every input counts.
    _, all_ = composite.evaluate_inputs(comp(), [strong, weak, none], BASE.digest)
    assert len(all_) == 3
