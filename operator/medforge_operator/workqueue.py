"""A coalescing work queue: many triggers for one object (its own events, its Job's, its pods',
a timer) become one reconcile round, run by a fixed pool of threads.

A key queued while it is being reconciled runs once more afterwards, so no change is missed;
a key queued many times while waiting runs once. A round that raises is queued again with a
per-key exponential backoff (1 s, 2 s, 4 s, ... up to 5 minutes; reset by a round that
succeeds), so a fault is retried without waiting for the resync and without a hot loop.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

from medforge_operator.metrics import (
    WORKQUEUE_ADDS,
    WORKQUEUE_DEPTH,
    WORKQUEUE_QUEUE_SECONDS,
    WORKQUEUE_RETRIES,
    WORKQUEUE_WORK_SECONDS,
)

log = logging.getLogger("medforge.workqueue")


MAX_BODIES = 256


class WorkQueue:
    def __init__(
        self,
        handler: Callable[[Hashable, Any], None],
        workers: int,
        name: str = "medforge",
        backoff: tuple[float, float] = (1.0, 300.0),
    ) -> None:
        self._handler = handler
        self.name = name
        self._base, self._cap = backoff
        # The newest object seen with a trigger, if the trigger carried one (saves a read).
        self._bodies: dict[Hashable, Any] = {}
        self._cv = threading.Condition()
        self._waiting: OrderedDict[Hashable, float] = OrderedDict()  # key -> when added
        self._active: set[Hashable] = set()
        self._again: set[Hashable] = set()
        self._failures: dict[Hashable, int] = {}
        self._delayed: list[tuple[float, int, Hashable]] = []  # (due, tiebreak, key)
        self._seq = itertools.count()
        self._stopped = False
        self._threads = [
            threading.Thread(target=self._loop, name=f"reconcile-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def add(self, key: Hashable, body: Any = None) -> None:
        with self._cv:
            # Bodies are kept for at most MAX_BODIES waiting keys: objects in member namespaces
            # are the tenants' to write (and to make large), so a deep queue holds keys, and
            # its rounds read their objects fresh.
            if body is not None and (key in self._bodies or len(self._bodies) < MAX_BODIES):
                self._bodies[key] = body
            else:
                self._bodies.pop(key, None)  # a bare trigger: the worker reads the object fresh
            self._enqueue(key)

    def _enqueue(self, key: Hashable) -> None:
        """With the lock held."""
        WORKQUEUE_ADDS.labels(self.name).inc()
        if key in self._active:
            self._again.add(key)
        elif key not in self._waiting:
            self._waiting[key] = time.monotonic()
            self._cv.notify()
        WORKQUEUE_DEPTH.labels(self.name).set(len(self._waiting))

    def backoff(self, failures: int) -> float:
        """The wait before retry number `failures` (1, 2, ...)."""
        return float(min(self._cap, self._base * 2 ** min(failures - 1, 30)))

    def _promote_due(self) -> float | None:
        """Move retries that are due into the queue; seconds until the next one (None: none)."""
        now = time.monotonic()
        while self._delayed and self._delayed[0][0] <= now:
            _, _, key = heapq.heappop(self._delayed)
            self._enqueue(key)
        return self._delayed[0][0] - now if self._delayed else None

    def _next(self) -> tuple[Hashable, Any] | None:
        """The next key to work on (None: stopped), with the lock held."""
        while True:
            wait = self._promote_due()
            if self._stopped:
                return None
            if self._waiting:
                key, added = self._waiting.popitem(last=False)
                WORKQUEUE_DEPTH.labels(self.name).set(len(self._waiting))
                WORKQUEUE_QUEUE_SECONDS.labels(self.name).observe(time.monotonic() - added)
                self._active.add(key)
                return key, self._bodies.pop(key, None)
            self._cv.wait(wait)

    def _loop(self) -> None:
        while True:
            with self._cv:
                taken = self._next()
            if taken is None:
                return
            key, body = taken
            t0 = time.monotonic()
            ok = False
            try:
                self._handler(key, body)
                ok = True
            except Exception:
                log.exception("reconcile of %s failed; it is retried with backoff", key)
            finally:
                WORKQUEUE_WORK_SECONDS.labels(self.name).observe(time.monotonic() - t0)
                with self._cv:
                    self._finish(key, ok)

    def _finish(self, key: Hashable, ok: bool) -> None:
        """With the lock held: a key's round ended."""
        self._active.discard(key)
        if ok:
            self._failures.pop(key, None)
        else:
            n = self._failures[key] = self._failures.get(key, 0) + 1
            WORKQUEUE_RETRIES.labels(self.name).inc()
            due = time.monotonic() + self.backoff(n)
            heapq.heappush(self._delayed, (due, next(self._seq), key))
            self._cv.notify()  # a waiting worker recomputes its timeout
        if key in self._again:
            self._again.discard(key)
            self._waiting[key] = time.monotonic()
            self._cv.notify()

    def depth(self) -> int:
        with self._cv:
            return len(self._waiting) + len(self._active)

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify_all()


Key = tuple[str, str, str]  # (plural, namespace, name); namespace "" for cluster-scoped kinds


class FailedKeys:
    """Keys whose last round raised: the resync queues them again, whatever their status says."""

    def __init__(self) -> None:
        self._keys: set[Key] = set()
        self._lock = threading.Lock()

    def add(self, key: Key) -> None:
        with self._lock:
            self._keys.add(key)

    def discard(self, key: Key) -> None:
        with self._lock:
            self._keys.discard(key)

    def snapshot(self) -> set[Key]:
        with self._lock:
            return set(self._keys)

    def forget_all_but(self, keys: set[Key], seen: set[Key]) -> None:
        """Drop those of `keys` whose objects no longer exist (not in `seen`)."""
        with self._lock:
            self._keys.difference_update(keys - seen)
