"""Dynamic micro-batching: concurrent requests in one worker share one forward pass.

A request's image waits at most BATCH_WAIT_MS for others, and only while other requests are on their
way (`arriving`: being fetched or decoded); a lone request runs at once. A request with several images
(`submit_many`: /analyze/batch, /embed) hands them over as one group, which is never split between
forward passes (it may exceed BATCH_MAX_SIZE: its size is bounded by BATCH_FILES_MAX). Each input
carries its request's deadline, and one whose deadline has passed is dropped instead of encoded. A batch
that runs out of device memory (the engine's EngineOutOfMemory) is split and retried, so one big batch
never fails the requests in it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable

import torch

from clip_service.engines.base import EngineOutOfMemory
from clip_service.errors import DeadlineExceeded, OutOfMemory, ShuttingDown

log = logging.getLogger(__name__)


class _Pending:
    """One request's images, (N, 3, H, W), waiting for their (N, D) features."""

    __slots__ = ("pixels", "deadline", "done", "result", "error", "abandoned")

    def __init__(self, pixels: torch.Tensor, deadline: float | None):
        self.pixels = pixels
        self.deadline = deadline
        self.done = threading.Event()
        self.result: torch.Tensor | None = None
        self.error: BaseException | None = None
        self.abandoned = False

    def expired(self, now: float) -> bool:
        return self.abandoned or (self.deadline is not None and now >= self.deadline)


class MicroBatcher:
    """Collects (3, H, W) inputs from many threads and encodes them in batches on one thread."""

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], max_batch: int,
                 max_wait_s: float, arriving: Callable[[], int] = lambda: 0,
                 on_batch: Callable[[int], None] = lambda size: None):
        self.encode = encode  # (N, 3, H, W) -> (N, D); raises EngineOutOfMemory when memory runs out
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.arriving = arriving  # how many requests in this worker may submit soon
        self.on_batch = on_batch
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # recent batch sizes, for tests
        self._queue: queue.Queue[_Pending | None] = queue.Queue()  # None wakes the thread to stop
        self._held: _Pending | None = None  # taken from the queue but too big for the last batch
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._stopped = threading.Event()

    def submit(self, pixels: torch.Tensor, deadline: float | None = None) -> torch.Tensor:
        """One (3, H, W) input -> its (D,) feature; raises DeadlineExceeded at `deadline`
        (time.monotonic())."""
        return self.submit_many(pixels.unsqueeze(0), deadline)[0]

    def submit_many(self, pixels: torch.Tensor, deadline: float | None = None) -> torch.Tensor:
        """(N, 3, H, W) inputs of one request -> their (N, D) features, encoded in one forward pass
        (unless memory runs out); raises DeadlineExceeded at `deadline`."""
        self._ensure_thread()
        pending = _Pending(pixels, deadline)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        self._queue.put(pending)
        if not pending.done.wait(timeout):
            pending.abandoned = True
            raise DeadlineExceeded(f"The model did not answer within {timeout:.1f} s "
                                   "(REQUEST_TIMEOUT); the service is overloaded, retry later")
        if pending.error is not None:
            raise pending.error
        return pending.result

    def stop(self, timeout: float = 10.0) -> None:
        """End the batcher thread once its batch in hand is done, and wait for it.

        A daemon thread still inside a torch call when the interpreter exits aborts the whole process
        ("terminate called without an active exception"), so workers and tests stop it first.
        """
        with self._start_lock:
            self._stopped.set()
            thread = self._thread
        self._queue.put(None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _ensure_thread(self) -> None:
        # Started on first use, in the worker process: threads do not survive gunicorn's fork.
        with self._start_lock:
            if self._stopped.is_set():
                raise ShuttingDown("The service is shutting down; retry on another instance")
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="clip-batcher", daemon=True)
                self._thread.start()

    def _collect(self) -> list[_Pending]:
        """The next batch: at most max_batch images, unless its first group alone is bigger."""
        first, self._held = (self._held, None) if self._held is not None else (self._queue.get(), None)
        batch = [first]
        images = 0 if first is None else len(first.pixels)
        deadline = time.monotonic() + self.max_wait_s
        while images < self.max_batch and batch[-1] is not None:
            try:
                following = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.arriving() <= len(batch):
                    break
                try:
                    following = self._queue.get(timeout=min(remaining, 0.0005))
                except queue.Empty:
                    continue
            if following is not None and images + len(following.pixels) > self.max_batch:
                self._held = following  # the next batch starts with it
                break
            batch.append(following)
            images += 0 if following is None else len(following.pixels)
        now = time.monotonic()
        return [pending for pending in batch if pending is not None and not pending.expired(now)]

    def _run(self) -> None:
        while not self._stopped.is_set():
            batch = self._collect()
            if batch:
                self._encode(batch)

    def _encode(self, batch: list[_Pending]) -> None:
        try:
            features = self._features(torch.cat([pending.pixels for pending in batch]), len(batch) == 1)
        except Exception as error:  # handed to the waiting requests; the batcher thread lives on
            if isinstance(error, EngineOutOfMemory):
                if len(batch) > 1:
                    log.warning("Out of memory on a batch of %d requests; splitting it", len(batch))
                    middle = len(batch) // 2
                    self._encode(batch[:middle])
                    self._encode(batch[middle:])
                    return
                error = OutOfMemory("The model ran out of memory on this image; retry shortly")
            for pending in batch:
                pending.error = error
                pending.done.set()
            return
        start = 0
        for pending in batch:
            end = start + len(pending.pixels)
            pending.result = features[start:end]
            pending.done.set()
            start = end

    def _features(self, pixels: torch.Tensor, one_request: bool) -> torch.Tensor:
        """(N, 3, H, W) -> (N, D) in one forward pass; one request's images are halved until they fit
        when memory runs out (several requests' are split between requests instead, by _encode)."""
        try:
            features = self.encode(pixels)
        except EngineOutOfMemory:
            if not one_request or len(pixels) == 1:
                raise
            log.warning("Out of memory on a group of %d images; halving it", len(pixels))
            middle = len(pixels) // 2
            return torch.cat([self._features(pixels[:middle], True), self._features(pixels[middle:], True)])
        self.batch_sizes.append(len(pixels))
        self.on_batch(len(pixels))
        return features
