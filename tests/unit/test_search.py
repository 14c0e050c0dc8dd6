"""The coefficient search (nevergrad NGOpt): it finds the minimum at any budget, and neither a
finished nor a failed search leaves an optimiser thread behind that would keep the merge
process alive."""

from __future__ import annotations

import threading

import pytest

from medforge_merger.search import SearchSettings, search_pair


def waiting_optimiser_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if hasattr(t, "messages_tell") and t.is_alive()]


def bowl(a: float, b: float) -> float:
    return (a - 0.3) ** 2 + (b + 0.2) ** 2


# NGOpt picks different optimisers by budget: 150 reaches its meta-model, which numpy 2.4 broke.
@pytest.mark.parametrize("budget", [40, 150, 1000])
def test_the_search_finds_the_penalised_minimum_at_any_budget(budget: int) -> None:
    a, b, value = search_pair(bowl, SearchSettings(budget=budget), 0)
    # With the L1 penalty 0.05 * mean(|a|, |b|), the minimum moves 0.0125 towards zero.
    assert a == pytest.approx(0.2875, abs=0.02) and b == pytest.approx(-0.1875, abs=0.02)
    assert value == pytest.approx(bowl(a, b) + 0.05 * (abs(a) + abs(b)) / 2)
    assert not waiting_optimiser_threads()


def test_a_failed_search_leaves_no_thread_waiting() -> None:
    calls = 0

    def flaky(a: float, b: float) -> float:
        nonlocal calls
        calls += 1
        if calls == 12:
            raise RuntimeError("the evaluation failed")
        return bowl(a, b)

    with pytest.raises(RuntimeError, match="the evaluation failed"):
        search_pair(flaky, SearchSettings(budget=40), 0)
    assert not waiting_optimiser_threads()
