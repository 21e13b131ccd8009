"""The micro-batcher alone (runtime/batching.py), with plain functions for encoders: no model needed."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from clip_service.engines.base import EngineOutOfMemory
from clip_service.errors import DeadlineExceeded, OutOfMemory, ShuttingDown
from clip_service.runtime.batching import MicroBatcher
from tests.support.waiting import wait_for


def item(value: float) -> torch.Tensor:
    return torch.full((3, 2, 2), value)


def features_of(pixels: torch.Tensor) -> torch.Tensor:
    """(N, 3, 2, 2) -> (N, 1): each input's first value, so answers can be told apart."""
    return pixels[:, 0, 0, :1].clone()


@pytest.fixture
def batchers():
    made = []

    def make(*args, **kwargs) -> MicroBatcher:
        made.append(MicroBatcher(*args, **kwargs))
        return made[-1]

    yield make
    for batcher in made:
        batcher.stop()


def test_each_caller_gets_its_own_feature(batchers):
    batcher = batchers(features_of, max_batch=4, max_wait_s=0.05, arriving=lambda: 6)
    results = {}

    def submit(value):
        results[value] = float(batcher.submit(item(value), time.monotonic() + 10)[0])

    threads = [threading.Thread(target=submit, args=(float(value),)) for value in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == {float(value): float(value) for value in range(6)}
    assert sum(batcher.batch_sizes) == 6 and max(batcher.batch_sizes) <= 4


def test_an_input_whose_deadline_passed_is_dropped_not_encoded(batchers):
    busy, release, encoded = threading.Event(), threading.Event(), []

    def slow(pixels):
        encoded.extend(features_of(pixels)[:, 0].tolist())
        busy.set()
        release.wait(10)
        return features_of(pixels)

    batcher = batchers(slow, max_batch=8, max_wait_s=0.0)
    first = threading.Thread(target=batcher.submit, args=(item(1.0), time.monotonic() + 10))
    first.start()
    assert busy.wait(5)  # the batcher thread is inside the first batch
    began = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="REQUEST_TIMEOUT"):
        batcher.submit(item(2.0), time.monotonic() + 0.2)
    assert time.monotonic() - began < 1.0
    release.set()
    first.join(5)
    assert batcher.submit(item(3.0), time.monotonic() + 5)[0] == 3.0
    assert encoded == [1.0, 3.0], "the expired input was encoded anyway"


def fits_at_most(images: int, tried: list[int]):
    """An encoder whose device runs out of memory on more than `images`; it notes each batch's size."""
    def encode(pixels):
        tried.append(len(pixels))
        if len(pixels) > images:
            raise EngineOutOfMemory("out of memory")
        return features_of(pixels)
    return encode


def test_out_of_memory_splits_the_batch_until_it_fits(batchers):
    tried = []
    small_memory = fits_at_most(2, tried)
    batcher = batchers(small_memory, max_batch=8, max_wait_s=0.5, arriving=lambda: 8)
    results = [None] * 8

    def submit(index):
        results[index] = float(batcher.submit(item(float(index)), time.monotonic() + 10)[0])

    threads = [threading.Thread(target=submit, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == [float(index) for index in range(8)]
    assert max(tried) > 2 and max(batcher.batch_sizes) <= 2


def test_out_of_memory_on_one_input_is_the_503_error(batchers):
    def no_memory(pixels):
        raise EngineOutOfMemory("out of memory")

    batcher = batchers(no_memory, max_batch=8, max_wait_s=0.0)
    with pytest.raises(OutOfMemory, match="ran out of memory") as caught:
        batcher.submit(item(1.0), time.monotonic() + 5)
    assert caught.value.status == 503


def test_other_errors_reach_the_caller_and_the_thread_lives_on(batchers):
    failing = threading.Event()
    failing.set()

    def flaky(pixels):
        if failing.is_set():
            raise RuntimeError("device-side assert")
        return features_of(pixels)

    batcher = batchers(flaky, max_batch=8, max_wait_s=0.0)
    with pytest.raises(RuntimeError, match="device-side assert"):
        batcher.submit(item(1.0), time.monotonic() + 5)
    failing.clear()
    assert batcher.submit(item(2.0), time.monotonic() + 5)[0] == 2.0


def test_a_stopped_batcher_refuses_new_work(batchers):
    batcher = batchers(features_of, max_batch=8, max_wait_s=0.0)
    assert batcher.submit(item(1.0), time.monotonic() + 5)[0] == 1.0
    batcher.stop()
    with pytest.raises(ShuttingDown, match="shutting down") as caught:
        batcher.submit(item(2.0), time.monotonic() + 5)
    assert caught.value.status == 503


def test_without_arrivals_a_lone_input_does_not_wait(batchers):
    batcher = batchers(features_of, max_batch=8, max_wait_s=5.0, arriving=lambda: 1)
    began = time.monotonic()
    batcher.submit(item(1.0), time.monotonic() + 10)
    assert time.monotonic() - began < 1.0


def group(*values: float) -> torch.Tensor:
    return torch.stack([item(value) for value in values])  # (N, 3, 2, 2)


def test_a_requests_group_is_one_pass_even_past_max_batch(batchers):
    batcher = batchers(features_of, max_batch=4, max_wait_s=0.0)
    features = batcher.submit_many(group(*map(float, range(6))), time.monotonic() + 5)
    assert features[:, 0].tolist() == [float(value) for value in range(6)]
    assert list(batcher.batch_sizes) == [6]


def test_groups_share_a_pass_only_when_both_fit(batchers):
    gate, passes = threading.Event(), []

    def gated(pixels):
        passes.append(features_of(pixels)[:, 0].tolist())
        gate.wait(10)
        return features_of(pixels)

    batcher = batchers(gated, max_batch=4, max_wait_s=0.0)
    results = {}

    def submit(name, values):
        results[name] = batcher.submit_many(group(*values), time.monotonic() + 10)[:, 0].tolist()

    first = threading.Thread(target=submit, args=("first", (1.0,)))
    first.start()
    while not passes:  # the batcher is inside the first pass; the next three wait in the queue
        time.sleep(0.01)
    others = [threading.Thread(target=submit, args=(name, values)) for name, values in
              (("a", (2.0, 3.0)), ("b", (4.0, 5.0, 6.0)), ("c", (7.0,)))]
    for queued, thread in enumerate(others, start=1):
        thread.start()
        # queued in this order: the next starts only once this one waits in the batcher's queue
        assert wait_for(lambda queued=queued: batcher._queue.qsize() == queued, interval=0.005)
    gate.set()
    for thread in [first, *others]:
        thread.join(10)
    assert results == {"first": [1.0], "a": [2.0, 3.0], "b": [4.0, 5.0, 6.0], "c": [7.0]}
    assert passes == [[1.0], [2.0, 3.0], [4.0, 5.0, 6.0, 7.0]]  # b did not fit beside a: it led the next


def test_out_of_memory_halves_one_requests_group(batchers):
    tried = []
    small_memory = fits_at_most(2, tried)
    batcher = batchers(small_memory, max_batch=8, max_wait_s=0.0)
    features = batcher.submit_many(group(*map(float, range(5))), time.monotonic() + 5)
    assert features[:, 0].tolist() == [float(value) for value in range(5)]
    assert tried == [5, 2, 3, 1, 2] and list(batcher.batch_sizes) == [2, 1, 2]
