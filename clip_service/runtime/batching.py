"""Dynamic micro-batching: concurrent requests in one worker share one forward pass.

A request's image waits at most BATCH_WAIT_MS for others, and only while other requests are on their
way (`arriving`: being fetched or decoded); a lone request runs at once. Each input carries its
request's deadline, and one whose deadline has passed is dropped instead of encoded. A batch that runs
out of device memory (the engine's EngineOutOfMemory) is split and retried, so one big batch never fails
the requests in it.
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
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._stopped = threading.Event()

    def submit(self, pixels: torch.Tensor, deadline: float | None = None) -> torch.Tensor:
        """One input -> its (D,) feature; raises DeadlineExceeded at `deadline` (time.monotonic())."""
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
        batch = [self._queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch and batch[-1] is not None:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except queue.Empty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.arriving() <= len(batch):
                break
            try:
                batch.append(self._queue.get(timeout=min(remaining, 0.0005)))
            except queue.Empty:
                continue
        now = time.monotonic()
        return [pending for pending in batch if pending is not None and not pending.expired(now)]

    def _run(self) -> None:
        while not self._stopped.is_set():
            batch = self._collect()
            if batch:
                self._encode(batch)

    def _encode(self, batch: list[_Pending]) -> None:
        try:
            features = self.encode(torch.stack([pending.pixels for pending in batch]))
        except Exception as error:  # handed to the waiting requests; the batcher thread lives on
            if isinstance(error, EngineOutOfMemory):
                if len(batch) > 1:
                    log.warning("Out of memory on a batch of %d; splitting it", len(batch))
                    middle = len(batch) // 2
                    self._encode(batch[:middle])
                    self._encode(batch[middle:])
                    return
                error = OutOfMemory("The model ran out of memory on this image; retry shortly")
            for pending in batch:
                pending.error = error
                pending.done.set()
            return
        self.batch_sizes.append(len(batch))
        self.on_batch(len(batch))
        for pending, feature in zip(batch, features, strict=True):
            pending.result = feature
            pending.done.set()
