"""The site gate's decision table (medforge_operator.composite.sites): quorum, the worst site,
significance for the site's sample count, corroboration, timeouts, sets too small, no quorum."""

from __future__ import annotations

from typing import Any

import pytest

from medforge_operator.composite import sites

pytestmark = pytest.mark.unit
BEFORE, AFTER = "2026-12-07T10:00:00Z", "2026-12-07T12:00:00Z"


def fig(acc: float, n: int = 400) -> dict[str, Any]:
    return {"accuracy": acc, "samples": n, "classes": 2, "f1": acc}


def site(name: str, state: str, cand: float | None = None, served: float | None = None,
         n: int = 400) -> dict[str, Any]:  # fmt: skip
    out: dict[str, Any] = {"site": f"{name}/evs", "task": "t", "state": state}
    if cand is not None:
        out["candidate"] = fig(cand, n)
    if served is not None:
        out["served"] = fig(served, n)
    return out


def evaluation(*s: dict[str, Any]) -> dict[str, Any]:
    return {"deadline": "2026-12-07T11:00:00Z", "sites": list(s)}


def rule(**gate: Any) -> sites.SiteRule:
    corroboration = gate.pop("corroboration", 1)
    return sites.SiteRule.from_spec({"sites": gate, "corroboration": corroboration})


def test_the_worst_site_decides_not_the_mean() -> None:
    ev = evaluation(
        site("a", sites.REPORTED, 0.99, 0.80),
        site("b", sites.REPORTED, 0.99, 0.80),
        site("c", sites.REPORTED, 0.60, 0.90),  # the mean still improves
    )
    d = sites.decide(ev, rule(), BEFORE)
    assert d.done and not d.accepted and d.reason == "SiteRegression"
    assert d.regressed == ["c/evs"] and "site c/evs" in d.message


def test_a_drop_too_small_to_tell_from_noise_does_not_reject() -> None:
    small = evaluation(site("a", sites.REPORTED, 0.70, 0.85, n=25))
    assert sites.decide(small, rule(), BEFORE).accepted  # 15 points on 25 images: noise
    large = evaluation(site("a", sites.REPORTED, 0.70, 0.85, n=2000))
    assert not sites.decide(large, rule(), BEFORE).accepted


def test_corroboration_keeps_one_adversarial_site_from_vetoing() -> None:
    ev = evaluation(site("a", sites.REPORTED, 0.10, 0.95), site("b", sites.REPORTED, 0.95, 0.95))
    d = sites.decide(ev, rule(corroboration=2), BEFORE)
    assert d.done and d.accepted and "fewer than gate.corroboration 2" in d.message
    both = evaluation(site("a", sites.REPORTED, 0.1, 0.95), site("b", sites.REPORTED, 0.2, 0.95))
    assert not sites.decide(both, rule(corroboration=2), BEFORE).accepted


def test_waits_for_every_site_until_the_timeout() -> None:
    ev = evaluation(site("a", sites.REPORTED, 0.9, 0.9), site("b", sites.PENDING))
    assert not sites.decide(ev, rule(quorum=1), BEFORE).done
    d = sites.decide(ev, rule(quorum=1), AFTER)  # the silent site does not block the quorum
    assert d.done and d.accepted and "1 did not" in d.message


def test_no_quorum_by_the_timeout_rejects_without_blame() -> None:
    ev = evaluation(site("a", sites.REPORTED, 0.9, 0.9), site("b", sites.PENDING))
    d = sites.decide(ev, rule(quorum=2), AFTER)
    assert d.done and not d.accepted and d.reason == "QuorumNotReached" and not d.regressed
    failed = evaluation(site("a", sites.REPORTED, 0.9, 0.9), site("b", sites.FAILED))
    assert sites.decide(failed, rule(quorum=2), BEFORE).reason == "QuorumNotReached"


def test_a_regression_rejects_before_the_others_report() -> None:
    ev = evaluation(site("a", sites.REPORTED, 0.2, 0.9), site("b", sites.PENDING))
    d = sites.decide(ev, rule(), BEFORE)
    assert d.done and d.reason == "SiteRegression"


@pytest.mark.parametrize(
    ("quorum", "n", "need"),
    [("100%", 3, 3), ("50%", 3, 2), ("34%", 3, 2), ("0%", 3, 1), (2, 3, 2), (5, 3, 3), (2, 0, 0)],
)
def test_quorum_counts_and_fractions(quorum: Any, n: int, need: int) -> None:
    assert rule(quorum=quorum).needed(n) == need


def test_too_small_counts_toward_the_quorum_and_keeps_no_figure() -> None:
    rec = {"site": "a/evs", "task": "t", "minSamples": 20, "state": sites.PENDING}
    got = sites.report(rec, {"state": "Reported", "candidate": fig(0.9, 5)}, BEFORE)
    assert got["state"] == sites.TOO_SMALL and "candidate" not in got
    said = sites.report(rec, {"state": "TooSmall", "candidate": fig(0.9, 500)}, BEFORE)
    assert said["state"] == sites.TOO_SMALL and "candidate" not in said
    ev = evaluation(got, site("b", sites.REPORTED, 0.9, 0.9))
    assert sites.decide(ev, rule(quorum=2), BEFORE).accepted
    kept = sites.settled_sites(ev)
    assert kept[0] == {"site": "a/evs", "task": "t", "state": sites.TOO_SMALL}


def test_reports_keep_finite_figures_and_compare_only_the_same_images() -> None:
    rec = {"site": "a/evs", "task": "t", "minSamples": 1}
    raw = {
        "candidate": {**fig(0.9), "auc": float("nan"), "recall": {"x": 0.5, "y": "bad"}},
        "served": fig(0.8, 399),
        "overlap": 3,
    }
    got = sites.report(rec, raw, BEFORE)
    assert "auc" not in got["candidate"] and got["candidate"]["recall"] == {"x": 0.5}
    assert "served" not in got  # another sample count: not the same images
    assert got["overlap"] == 3
    assert sites.report(rec, {"candidate": {"accuracy": 2}}, BEFORE)["state"] == sites.FAILED


def test_no_served_revision_means_nothing_to_regress_against() -> None:
    ev = evaluation(site("a", sites.REPORTED, 0.1))
    assert sites.decide(ev, rule(), BEFORE).accepted


def test_one_hospital_with_many_sets_neither_fills_the_quorum_nor_corroborates() -> None:
    def at(ns: str, name: str, state: str, cand: float | None = None,
           served: float | None = None) -> dict[str, Any]:  # fmt: skip
        return site(name, state, cand, served) | {"namespace": ns}

    many = evaluation(
        at("h-a", "a1", sites.REPORTED, 0.1, 0.95),
        at("h-a", "a2", sites.REPORTED, 0.1, 0.95),
        at("h-b", "b", sites.REPORTED, 0.95, 0.95),
    )
    d = sites.decide(many, rule(corroboration=2), BEFORE)
    assert d.done and d.accepted and "1 regressed" in d.message
    silent = evaluation(
        at("h-a", "a1", sites.REPORTED, 0.9, 0.9),
        at("h-a", "a2", sites.REPORTED, 0.9, 0.9),
        at("h-a", "a3", sites.REPORTED, 0.9, 0.9),
        at("h-b", "b", sites.PENDING),
        at("h-c", "c", sites.PENDING),
    )
    d = sites.decide(silent, rule(quorum="60%"), AFTER)
    assert d.reason == "QuorumNotReached" and "1 of 3 hospital(s)" in d.message


def test_by_default_a_silent_hospital_delays_but_never_halts() -> None:
    ev = evaluation(
        site("a", sites.REPORTED, 0.9, 0.9), site("b", sites.PENDING), site("c", sites.PENDING)
    )
    assert sites.SiteRule.from_spec({}).needed(3) == 2
    two = evaluation(*ev["sites"][:2])
    assert sites.decide(two, sites.SiteRule.from_spec({}), AFTER).accepted
    assert not sites.decide(two, sites.SiteRule.from_spec({}), BEFORE).done


def test_history_keeps_headline_figures_of_the_newest_revisions_only() -> None:
    from medforge_operator.composite import settling

    figs = {"accuracy": 0.9, "f1": 0.8, "auc": 0.95, "samples": 40, "classes": 2,
            "recall": {"x": 0.9}}  # fmt: skip
    ev = {"sites": [{"site": "a/evs", "task": "t", "state": sites.REPORTED, "candidate": figs}]}
    kept = sites.settled_sites(ev)
    assert kept[0]["candidate"] == {"accuracy": 0.9, "f1": 0.8, "auc": 0.95, "samples": 40}
    old = [{"revision": r, "state": "Accepted", "sites": kept} for r in range(20, 0, -1)]
    outcome = settling.Outcome("Rejected", "x", {}, reason="SiteRegression", sites=kept)
    done = settling.finish_revision(
        {"history": old}, {"revision": 21}, outcome, "", "job", 30, BEFORE
    )
    with_sites = [h["revision"] for h in done["history"] if "sites" in h]
    assert with_sites == list(range(21, 11, -1))
