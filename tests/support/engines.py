"""Engines that misbehave on purpose: wrappers around the tiny real engine for fault tests.

Each wrapper delegates everything to the real engine, so preparing images and encoding work as usual,
and changes one call: `encode_images`, the call the micro-batcher makes for every batch, or, for
GatedEngine, `encode_texts`, which loading waits on.
"""

from __future__ import annotations

import threading
import time

import torch

from clip_service.engines.base import Engine, EngineOutOfMemory


class EngineWrapper:
    """Delegates to the real engine; records the size of every batch it is asked to encode."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self.batches: list[int] = []
        self._batches_lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def _record(self, pixels: torch.Tensor) -> None:
        with self._batches_lock:
            self.batches.append(int(pixels.shape[0]))

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        self._record(pixels)
        return self._engine.encode_images(pixels)


class SlowEngine(EngineWrapper):
    """Every batch takes `delay` seconds longer; `finished` is set after each slow batch."""

    def __init__(self, engine: Engine, delay: float):
        super().__init__(engine)
        self.delay = delay
        self.finished = threading.Event()

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        delay = self.delay
        self.finished.clear()
        if delay:
            time.sleep(delay)
        try:
            return super().encode_images(pixels)
        finally:
            self.finished.set()


class DeviceFaultEngine(EngineWrapper):
    """Raises what a broken GPU raises while `failing` is set."""

    MESSAGE = "CUDA error: device-side assert triggered"

    def __init__(self, engine: Engine):
        super().__init__(engine)
        self.failing = threading.Event()

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        self._record(pixels)
        if self.failing.is_set():
            raise RuntimeError(self.MESSAGE)
        return self._engine.encode_images(pixels)


class OutOfMemoryEngine(EngineWrapper):
    """Runs out of memory on batches larger than `max_batch` (0: on every batch, while `oom`)."""

    def __init__(self, engine: Engine, max_batch: int):
        super().__init__(engine)
        self.max_batch = max_batch
        self.oom = threading.Event()
        self.oom.set()
        self.failed: list[int] = []  # sizes of the batches that ran out of memory

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        self._record(pixels)
        if self.oom.is_set() and pixels.shape[0] > self.max_batch:
            self.failed.append(int(pixels.shape[0]))
            raise EngineOutOfMemory("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self._engine.encode_images(pixels)


class HangingEngine(EngineWrapper):
    """A hung device: while `hanging` is set, a batch blocks until `release` is set (at most 30 s)."""

    def __init__(self, engine: Engine):
        super().__init__(engine)
        self.hanging = threading.Event()
        self.release = threading.Event()

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        self._record(pixels)
        if self.hanging.is_set():
            self.release.wait(30)
        return self._engine.encode_images(pixels)


class GatedEngine(EngineWrapper):
    """Label encoding, and so loading, waits until `gate` is set (at most 30 s)."""

    def __init__(self, engine: Engine):
        super().__init__(engine)
        self.gate = threading.Event()

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        assert self.gate.wait(30), "the test never opened the gate"
        return self._engine.encode_texts(texts)
