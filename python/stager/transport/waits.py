"""Bounded waits: a round's works waited on helper threads against one deadline, so the calling
thread sees a timeout (and ``KeyboardInterrupt``) without ever blocking inside the backend.

gloo's point-to-point works only complete when waited on, and a wait that times out breaks the
whole group; :class:`_Waits` keeps those waits off the calling thread.
"""

from __future__ import annotations

import queue
import threading
import time
from datetime import timedelta
from typing import Any

from .._native import StagerError


def _as_timedelta(timeout: Any) -> timedelta:
    if isinstance(timeout, timedelta):
        if timeout.total_seconds() > 0:
            return timeout
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0:
        return timedelta(seconds=timeout)
    raise StagerError(f"timeout must be a positive timedelta or number of seconds, got {timeout!r}")


class _DeadlinePassed(Exception):
    pass


class _Waits:
    """Waits for a round's works on helper threads, against one deadline.

    One lane (thread) per key, e.g. per peer and direction: it waits its works in the order they
    were added, each with the time left until the deadline plus :attr:`GRACE_S` (so the calling
    thread, watching the deadline itself, always sees a timeout first), and reports each
    completion on one queue. :meth:`next` takes them in slices of :attr:`SLICE_S`, which is what
    lets ``KeyboardInterrupt`` through. Lanes outlive a failed round until their own waits end:
    they keep the works, and with them the buffers the backend may still write, alive."""

    GRACE_S = 2.0
    SLICE_S = 0.05

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._lanes: dict[Any, queue.SimpleQueue] = {}
        self.pending: dict[int, Any] = {}  # id → token, oldest first
        self._next_id = 0

    def add(self, lane: Any, work: Any, token: Any) -> None:
        inbox = self._lanes.get(lane)
        if inbox is None:
            inbox = self._lanes[lane] = queue.SimpleQueue()
            threading.Thread(target=self._lane, args=(inbox,), name="stager-transport-wait", daemon=True).start()
        ident = self._next_id
        self._next_id += 1
        self.pending[ident] = token
        inbox.put((ident, work))

    def _lane(self, inbox: queue.SimpleQueue) -> None:
        while True:
            item = inbox.get()
            if item is None:
                return
            ident, work = item
            try:
                left = self.deadline + self.GRACE_S - time.monotonic()
                work.wait(timedelta(seconds=max(left, 0.001)))
            except BaseException as err:
                self._done.put((ident, err))
            else:
                self._done.put((ident, None))
            del work, item

    def next(self) -> tuple[Any, BaseException | None]:
        """The next completed work's ``(token, error)``; raises _DeadlinePassed at the deadline."""
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise _DeadlinePassed()
            try:
                ident, err = self._done.get(timeout=min(self.SLICE_S, left))
            except queue.Empty:
                continue
            return self.pending.pop(ident), err

    def oldest(self) -> Any:
        return next(iter(self.pending.values()), None)

    def close(self) -> None:
        for inbox in self._lanes.values():
            inbox.put(None)
