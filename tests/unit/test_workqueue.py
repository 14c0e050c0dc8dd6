"""The coalescing work queue: a burst of triggers for one object is one round (plus one more if
a trigger arrives while it runs); different objects run in parallel."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Hashable
from typing import Any

from medforge_operator.workqueue import WorkQueue


def test_bursts_coalesce_and_nothing_is_missed() -> None:
    calls: list[tuple[Hashable, Any]] = []
    gate = threading.Event()
    started = threading.Event()

    def handler(key: Hashable, body: Any) -> None:
        calls.append((key, body))
        if key == "a" and len(calls) == 1:
            started.set()
            gate.wait(5)

    q = WorkQueue(handler, workers=2)
    try:
        q.add("a", {"v": 1})
        assert started.wait(5)
        for i in range(50):  # while "a" runs: these collapse into one more round
            q.add("a", {"v": i})
        q.add("b")
        gate.set()
        deadline = time.monotonic() + 5
        while q.depth() and time.monotonic() < deadline:
            time.sleep(0.01)
        a_calls = [body for key, body in calls if key == "a"]
        assert a_calls == [{"v": 1}, {"v": 49}]  # the newest body of the burst
        assert [key for key, _ in calls].count("b") == 1
    finally:
        q.stop()


def test_a_failing_round_does_not_stop_the_workers() -> None:
    seen: list[Hashable] = []

    def handler(key: Hashable, body: Any) -> None:
        seen.append(key)
        if key == "bad":
            raise RuntimeError("boom")

    q = WorkQueue(handler, workers=1)
    try:
        q.add("bad")
        q.add("good")
        deadline = time.monotonic() + 5
        while "good" not in seen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen == ["bad", "good"]
    finally:
        q.stop()


def test_a_failing_key_is_retried_with_growing_backoff_until_it_succeeds() -> None:
    times: list[float] = []
    done = threading.Event()

    def handler(key: Hashable, body: Any) -> None:
        times.append(time.monotonic())
        if len(times) < 4:
            raise RuntimeError("store unreachable")
        done.set()

    q = WorkQueue(handler, workers=2, backoff=(0.05, 0.3))
    try:
        q.add("k")
        assert done.wait(5), times
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert len(times) == 4
        assert gaps[0] >= 0.05 and gaps[1] >= 0.1 and gaps[2] >= 0.2  # 0.05, 0.1, 0.2
        time.sleep(0.4)
        assert len(times) == 4  # success resets: no more retries
        assert [q.backoff(n) for n in (1, 2, 3, 4, 10)] == [0.05, 0.1, 0.2, 0.3, 0.3]
    finally:
        q.stop()


def test_the_queue_reports_controller_runtime_metrics() -> None:
    from prometheus_client import REGISTRY

    def sample(name: str) -> float:
        return float(REGISTRY.get_sample_value(name, {"name": "metrics-test"}) or 0.0)

    q = WorkQueue(lambda k, b: None, workers=1, name="metrics-test")
    try:
        for i in range(3):
            q.add(i)
        deadline = time.monotonic() + 5
        while q.depth() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sample("workqueue_adds_total") == 3
        assert sample("workqueue_work_duration_seconds_count") == 3
        assert sample("workqueue_queue_duration_seconds_count") == 3
        assert sample("workqueue_depth") == 0
    finally:
        q.stop()


def test_a_deep_queue_keeps_keys_not_bodies() -> None:
    """Objects in member namespaces are the tenants' to multiply and enlarge: past MAX_BODIES
    waiting keys the queue keeps no more bodies, and those rounds read their objects fresh."""
    from medforge_operator.workqueue import MAX_BODIES

    calls: list[tuple[Hashable, Any]] = []
    gate = threading.Event()

    def handler(key: Hashable, body: Any) -> None:
        gate.wait(5)
        calls.append((key, body))

    q = WorkQueue(handler, workers=1)
    try:
        for i in range(MAX_BODIES * 3):
            q.add(i, {"spec": "x" * 1000})
        assert len(q._bodies) <= MAX_BODIES
        gate.set()
        deadline = time.monotonic() + 10
        while q.depth() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(calls) == MAX_BODIES * 3  # every key still gets its round
        assert sum(body is None for _, body in calls) >= MAX_BODIES * 2 - 1
    finally:
        q.stop()
