"""Waiting in tests: for a condition that becomes true in the background, and never for ever."""

from __future__ import annotations

import contextlib
import signal
import time


def wait_for(condition, timeout: float = 10, interval: float = 0.05):
    """condition()'s first true value within `timeout` seconds, else its value at the end."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    return condition()


@contextlib.contextmanager
def no_hang(seconds: int = 10):
    """Fail a request that hangs instead of hanging the test run (main thread, Unix)."""

    def hung(signum, frame):
        raise TimeoutError(f"the request was still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
