"""cores.py: a request's per-image work on several threads, in order, errors raised."""

from __future__ import annotations

import threading
import time

import pytest

from clip_service import cores


def test_results_keep_their_order_and_the_work_runs_side_by_side(monkeypatch):
    monkeypatch.setattr(cores.os, "cpu_count", lambda: 4)
    side_by_side = threading.Barrier(4, timeout=10)  # broken unless four items run at once

    def slow_square(value: int) -> int:
        if value < 4:
            side_by_side.wait()
        time.sleep(0.01)
        return value * value

    assert cores.map_on_cores(slow_square, list(range(8))) == [value * value for value in range(8)]
    assert not side_by_side.broken


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
