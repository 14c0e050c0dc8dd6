"""A coalescing work queue: many triggers for one object (its own events, its Job's, its pods',
a timer) become one reconcile round, run by a fixed pool of threads.

A key queued while it is being reconciled runs once more afterwards, so no change is missed;
a key queued many times while waiting runs once.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

log = logging.getLogger("medforge.workqueue")


class WorkQueue:
    def __init__(self, handler: Callable[[Hashable, Any], None], workers: int) -> None:
        self._handler = handler
        # The newest object seen with a trigger, if the trigger carried one (saves a read).
        self._bodies: dict[Hashable, Any] = {}
        self._cv = threading.Condition()
        self._waiting: OrderedDict[Hashable, None] = OrderedDict()
        self._active: set[Hashable] = set()
        self._again: set[Hashable] = set()
        self._stopped = False
        self._threads = [
            threading.Thread(target=self._loop, name=f"reconcile-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def add(self, key: Hashable, body: Any = None) -> None:
        with self._cv:
            if body is not None:
                self._bodies[key] = body
            else:
                self._bodies.pop(key, None)  # a bare trigger: the worker reads the object fresh
            if key in self._active:
                self._again.add(key)
            elif key not in self._waiting:
                self._waiting[key] = None
                self._cv.notify()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._stopped:
                    self._cv.wait()
                if self._stopped:
                    return
                key, _ = self._waiting.popitem(last=False)
                body = self._bodies.pop(key, None)
                self._active.add(key)
            try:
                self._handler(key, body)
            except Exception:
                log.exception("reconcile of %s failed; it runs again on the next trigger", key)
            finally:
                with self._cv:
                    self._active.discard(key)
                    if key in self._again:
                        self._again.discard(key)
                        self._waiting[key] = None
                        self._cv.notify()

    def depth(self) -> int:
        with self._cv:
            return len(self._waiting) + len(self._active)

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
