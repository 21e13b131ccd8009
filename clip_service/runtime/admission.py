"""Admission control: at most MAX_QUEUE requests in progress per worker, each with its deadline.

A request over the limit is refused at once (503, Retry-After) instead of queueing without bound, and
every request gets REQUEST_TIMEOUT from the moment it arrived (as the server reports it; under
gunicorn the front door does, see http/front_door.py), so time spent waiting for a thread counts.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from clip_service import metrics
from clip_service.errors import DeadlineExceeded, Overloaded


class Admission:
    """Counts the requests in progress; `in_flight` is also what the batcher may expect to arrive."""

    def __init__(self, max_queue: int, request_timeout: float):
        self.max_queue = max_queue
        self.request_timeout = request_timeout
        self._in_flight = 0
        self._lock = threading.Lock()

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet answered: being fetched, decoded or encoded."""
        return self._in_flight

    @contextlib.contextmanager
    def admitted(self, arrived: float | None = None) -> Iterator[float]:
        """Hold a place for one request, or raise Overloaded at once when full.

        Yields the request's deadline (time.monotonic() based): REQUEST_TIMEOUT after `arrived`, when
        the server says when the request arrived, else from now. A request whose time already ran out
        while it waited gets 504 at once.
        """
        now = time.monotonic()
        deadline = (now if arrived is None else arrived) + self.request_timeout
        if now >= deadline:
            raise DeadlineExceeded(f"The request waited {now - arrived:.1f} s for a free thread, past "
                                   f"REQUEST_TIMEOUT={self.request_timeout:g} s; retry later")
        with self._lock:
            if self._in_flight >= self.max_queue:
                raise Overloaded(f"The service is busy ({self._in_flight} requests in progress, "
                                 f"MAX_QUEUE={self.max_queue}); retry shortly")
            self._in_flight += 1
        metrics.IN_FLIGHT.inc()
        try:
            yield deadline
        finally:
            metrics.IN_FLIGHT.dec()
            with self._lock:
                self._in_flight -= 1
