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

log = logging.getLogger("medforge.workqueue")


class WorkQueue:
    def __init__(self, handler: Callable[[Hashable], None], workers: int) -> None:
        self._handler = handler
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

    def add(self, key: Hashable) -> None:
        with self._cv:
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
                self._active.add(key)
            try:
                self._handler(key)
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
