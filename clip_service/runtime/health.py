"""Whether inference works: the one place health is written, and the canary that keeps checking it.

The load's outcome, every request that breaks the model and the canary report here; `/health` and the
clip_healthy metric read it. A request's own errors (bad input, a deadline, out of memory) are not a
broken model and do not count.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from PIL import Image

from clip_service import metrics
from clip_service.errors import NotReady, ServiceError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class Health:
    """The model's health after it loaded: None while inference works, else what broke it."""

    def __init__(self):
        self.inference_error: str | None = None
        self._lock = threading.Lock()

    def model_settled(self, loaded: bool) -> None:
        """The background load finished: healthy if it loaded (until inference fails)."""
        metrics.HEALTHY.set(1 if loaded else 0)

    def inference_failed(self, error: BaseException) -> None:
        with self._lock:
            first = self.inference_error is None
            self.inference_error = f"{type(error).__name__}: {error}"
        if first:
            log.error("Inference failed: %s: %s", type(error).__name__, error, exc_info=error)
        metrics.HEALTHY.set(0)

    def inference_worked(self) -> None:
        with self._lock:
            recovered, self.inference_error = self.inference_error is not None, None
        if recovered:
            log.warning("Inference works again")
            metrics.HEALTHY.set(1)

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Run one request's inference: an unexpected error marks the model broken and becomes a 503."""
        try:
            yield
        except ServiceError:
            raise
        except Exception as error:  # a broken device: health must say so until inference works
            self.inference_failed(error)
            raise NotReady("The model failed on this image; the service is checking its device "
                           "(see /health); retry shortly") from error
        self.inference_worked()


class Canary:
    """Readiness that means something: a tiny inference every HEALTH_CANARY_SECONDS.

    While inference fails the canary runs every second, so health recovers promptly.
    """

    def __init__(self, image_features: Callable[[Image.Image, float], torch.Tensor],
                 input_size: tuple[int, int], interval: float, timeout: float, health: Health):
        self.image_features = image_features  # (image, deadline) -> (D,) features
        self.probe = Image.new("RGB", input_size[::-1], (128, 128, 128))
        self.interval = interval
        self.timeout = timeout
        self.health = health
        self._stopped = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name="clip-canary", daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.wait(min(self.interval, 1.0) if self.health.inference_error
                                     else self.interval):
            self.check()

    def check(self) -> bool:
        """One probe: True if it gave finite features; the outcome goes to health either way."""
        try:
            features = self.image_features(self.probe, time.monotonic() + self.timeout)
            if not bool(features.isfinite().all()):
                raise RuntimeError("the model returned non-finite features")
        except Exception as error:  # whatever broke inference is what health must report
            self.health.inference_failed(error)
            return False
        self.health.inference_worked()
        return True
