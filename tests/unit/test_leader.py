"""The leader-election protocol's decisions, on Leases as the API server holds them."""

from __future__ import annotations

import datetime as dt

from medforge_operator.leader import Step, decide, held_lease

NOW = dt.datetime(2026, 11, 28, 12, 0, 0, tzinfo=dt.UTC)


def lease(holder: str, renewed_ago: float, duration: int = 15) -> dict[str, object]:
    stamp = (NOW - dt.timedelta(seconds=renewed_ago)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {
        "metadata": {"name": "l", "resourceVersion": "7"},
        "spec": {"holderIdentity": holder, "renewTime": stamp, "leaseDurationSeconds": duration},
    }


def test_who_acts_on_the_lease() -> None:
    assert decide(None, "me", NOW) == Step.CREATE
    assert decide(lease("me", 5), "me", NOW) == Step.RENEW
    assert decide(lease("other", 5), "me", NOW) == Step.WAIT  # live: stand by
    assert decide(lease("other", 16), "me", NOW) == Step.TAKE  # unrenewed past its duration
    assert decide(lease("", 1), "me", NOW) == Step.TAKE  # released on a clean stop


def test_the_written_lease_is_a_compare_and_swap() -> None:
    taken = held_lease(lease("other", 20), "l", "me", NOW, 15)
    assert taken["metadata"]["resourceVersion"] == "7"  # 409 if anyone wrote since the read
    assert taken["spec"]["holderIdentity"] == "me" and taken["spec"]["leaseTransitions"] == 1
    renewed = held_lease(taken, "l", "me", NOW, 15)
    assert renewed["spec"]["leaseTransitions"] == 1  # a renewal is no transition
    assert renewed["spec"]["acquireTime"] == taken["spec"]["acquireTime"]
