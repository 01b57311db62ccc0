"""The rank's background I/O thread: reads weights from disk while compute runs.

One thread per rank, jobs in priority order (lower first, FIFO within a priority): the
sliding window's next blocks come before speculative expert prefetches.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

log = logging.getLogger(__name__)

WINDOW = 0  # priority of sliding-window loads
NEEDED = 0  # and of read-ahead the current layer needs (its missed experts)
PREFETCH = 1  # priority of predicted experts


class IoThread:
    def __init__(self, name: str = "weights-io"):
        self._jobs: queue.PriorityQueue[tuple[int, int, Callable[[], Any] | None, Future | None]] = \
            queue.PriorityQueue()
        self._order = itertools.count()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, priority: int, job: Callable[[], Any]) -> Future:
        future: Future = Future()
        self._jobs.put((priority, next(self._order), job, future))
        return future

    def _run(self) -> None:
        while True:
            _, _, job, future = self._jobs.get()
            if job is None or future is None:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(job())
            except BaseException as exc:  # handed to whoever waits on the future
                log.exception("I/O job failed")
                future.set_exception(exc)

    def close(self) -> None:
        self._jobs.put((-1, -1, None, None))
        self._thread.join(timeout=5)
