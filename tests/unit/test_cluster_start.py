"""The cluster fixture's start: one failed start is retried on fresh state, never more."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import start_local_cluster


class Flaky:
    """Stands in for LocalCluster's start/stop protocol: fails its first `failures` starts."""

    failures = 0
    started: list[Path] = []
    purged: list[Path] = []

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir

    def up(self, log: bool = True) -> None:
        Flaky.started.append(self.dir)
        if len(Flaky.started) <= Flaky.failures:
            raise TimeoutError(f"etcd not ready (start {len(Flaky.started)})")

    def down(self, purge: bool = False) -> list[str]:
        assert purge
        Flaky.purged.append(self.dir)
        return []


@pytest.fixture(autouse=True)
def reset() -> Iterator[None]:
    Flaky.started, Flaky.purged = [], []
    yield
    for d in Flaky.started:  # the empty state directories the starts made
        d.rmdir()


def start(failures: int) -> Any:
    Flaky.failures = failures
    return start_local_cluster(Flaky)  # type: ignore[arg-type]


def test_a_first_start_that_works_is_used() -> None:
    assert start(0).dir == Flaky.started[0] and not Flaky.purged


def test_one_failed_start_is_retried_on_a_fresh_state_directory() -> None:
    with pytest.warns(UserWarning, match=r"trying once more: etcd not ready \(start 1\)"):
        lc = start(1)
    assert Flaky.purged == [Flaky.started[0]]
    assert lc.dir == Flaky.started[1] != Flaky.started[0]


def test_two_failed_starts_fail_with_both_errors() -> None:
    with (
        pytest.warns(UserWarning),
        pytest.raises(RuntimeError, match=r"twice; the first time: etcd not ready \(start 1\)"),
    ):
        start(2)
    assert Flaky.purged == Flaky.started and len(Flaky.started) == 2
