"""runtime/cores.py: a request's per-image work on several threads, in order, errors raised."""

from __future__ import annotations

import threading
import time

import pytest

from clip_service.runtime import cores


def test_results_keep_their_order_and_the_work_runs_side_by_side(monkeypatch):
    monkeypatch.setattr(cores.os, "cpu_count", lambda: 4)
    running, most = [0], [0]
    lock = threading.Lock()

    def slow_square(value: int) -> int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return value * value

    assert cores.map_on_cores(slow_square, list(range(8))) == [value * value for value in range(8)]
    assert most[0] == 4


def test_one_core_or_one_item_stays_on_the_calling_thread(monkeypatch):
    callers = set()

    def where(_):
        callers.add(threading.current_thread().name)

    monkeypatch.setattr(cores.os, "cpu_count", lambda: 1)
    cores.map_on_cores(where, [1, 2, 3])
    monkeypatch.setattr(cores.os, "cpu_count", lambda: 8)
    cores.map_on_cores(where, [1])
    assert callers == {threading.current_thread().name}


def test_an_exception_reaches_the_caller(monkeypatch):
    monkeypatch.setattr(cores.os, "cpu_count", lambda: 2)

    def fails_on_two(value):
        if value == 2:
            raise ValueError("two")
        return value

    with pytest.raises(ValueError, match="two"):
        cores.map_on_cores(fails_on_two, [1, 2, 3])
