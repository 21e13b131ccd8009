"""Closed-loop HTTP load for the benchmark: each thread sends its next request as soon as its previous
answer arrives, so the offered load adapts to the server and queueing shows up as latency.

The client runs on the same cores as the server it measures, so it does as little work as it can:
multipart bodies are encoded once, answers are not parsed (except once per cell, to check that the
server really answered with predictions), and every thread keeps one keep-alive connection.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import requests
from urllib3.filepost import encode_multipart_formdata

REQUEST_TIMEOUT = 300  # seconds; a slow answer is a data point, only a hung server is an error

# Sends one request on a thread's own session and returns the answer.
Send = Callable[[requests.Session], requests.Response]


def upload_request(url: str, data: bytes, filename: str = "photo.jpg") -> Send:
    """POST the image as multipart field `file`; the body is encoded once, not per request."""
    body, content_type = encode_multipart_formdata({"file": (filename, data, "image/jpeg")})
    headers = {"Content-Type": content_type}
    return lambda session: session.post(url, data=body, headers=headers, timeout=REQUEST_TIMEOUT)


def file_request(url: str, path: str) -> Send:
    """GET with `file=<server path>`: the server reads the image itself."""
    params = {"file": path}
    return lambda session: session.get(url, params=params, timeout=REQUEST_TIMEOUT)


def check_answer(send: Send) -> None:
    """One request whose answer must be a 200 success with predictions, else the cell is meaningless."""
    with requests.Session() as session:
        response = send(session)
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code != 200 or body.get("status") != "success" or "predictions" not in body:
        raise RuntimeError(f"not a success answer: {response.status_code} {response.text[:300]}")


def percentile(sorted_values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of already sorted values; None when there are none."""
    if not sorted_values:
        return None
    rank = max(1, round(fraction * len(sorted_values) + 0.5 - 1e-9))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass
class LoadResult:
    """What one closed-loop run saw: latencies of successes, errors by kind, wall time."""

    concurrency: int
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)

    def summary(self) -> dict:
        ordered = sorted(self.latencies_ms)
        p50, p99 = percentile(ordered, 0.50), percentile(ordered, 0.99)
        return {
            "concurrency": self.concurrency,
            "requests": len(ordered),
            "seconds": round(self.seconds, 3),
            "requests_per_s": round(len(ordered) / self.seconds, 3) if self.seconds else 0.0,
            "p50_ms": round(p50, 1) if p50 is not None else None,
            "p99_ms": round(p99, 1) if p99 is not None else None,
            "errors": sum(self.errors.values()),
            "error_kinds": dict(self.errors),
        }


class _Plan:
    """Shared between the threads: when to stop, and the answer count for the on_answer hook."""

    def __init__(self, seconds: float | None, total: int | None,
                 on_answer: Callable[[int], None] | None):
        self.deadline = time.perf_counter() + seconds if seconds is not None else None
        self.total = total
        self.on_answer = on_answer
        self.issued = 0
        self.answered = 0
        self.lock = threading.Lock()

    def claim(self) -> bool:
        """May this thread send one more request? (Duration: before the deadline; count: a ticket.)"""
        if self.deadline is not None and time.perf_counter() >= self.deadline:
            return False
        with self.lock:
            if self.total is not None and self.issued >= self.total:
                return False
            self.issued += 1
            return True

    def answered_one(self) -> None:
        with self.lock:
            self.answered += 1
            number = self.answered
        if self.on_answer is not None:
            self.on_answer(number)


def _worker(send: Send, plan: _Plan, result: LoadResult, lock: threading.Lock) -> None:
    latencies, errors = [], Counter()
    with requests.Session() as session:
        while plan.claim():
            started = time.perf_counter()
            try:
                response = send(session)
                status = response.status_code
            except requests.RequestException as error:
                status = type(error).__name__
            elapsed_ms = (time.perf_counter() - started) * 1000
            if status == 200:
                latencies.append(elapsed_ms)
            else:
                errors[str(status)] += 1
            plan.answered_one()
    with lock:
        result.latencies_ms.extend(latencies)
        result.errors.update(errors)


def run_closed_loop(send: Send, concurrency: int, seconds: float | None = None, total: int | None = None,
                    on_answer: Callable[[int], None] | None = None) -> LoadResult:
    """Run `concurrency` threads until `seconds` have passed or `total` requests were sent.

    Requests in flight at the deadline are waited for and counted, and the wall time runs until the
    last one is answered, so requests/s is never flattered by cutting off slow answers.
    `on_answer(n)` is called after the n-th answer (any status), on the thread that got it.
    """
    if (seconds is None) == (total is None):
        raise ValueError("give exactly one of seconds or total")
    plan = _Plan(seconds, total, on_answer)
    result, lock = LoadResult(concurrency), threading.Lock()
    threads = [threading.Thread(target=_worker, args=(send, plan, result, lock), daemon=True)
               for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = time.perf_counter() - started
    return result
