"""Prometheus metrics, correct under several gunicorn workers.

With PROMETHEUS_MULTIPROC_DIR set (gunicorn.conf.py sets it before any worker starts), every worker
writes its samples to files there and `/metrics` adds them up across workers.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

REQUESTS = Counter("clip_requests_total", "HTTP requests answered",
                   ["route", "input", "status"])
STAGE_SECONDS = Histogram("clip_stage_seconds", "Time spent per request stage",
                          ["stage"], buckets=LATENCY_BUCKETS)
BATCH_SIZE = Histogram("clip_batch_size", "Images per forward pass", buckets=BATCH_BUCKETS)
IN_FLIGHT = Gauge("clip_requests_in_flight", "Requests being handled (admission queue depth)",
                  multiprocess_mode="livesum")
MODEL_INFO = Gauge("clip_model_info", "The loaded model (value 1), by model, device and label set",
                   ["model", "framework", "device", "labels_version"], multiprocess_mode="liveall")
LABELS = Gauge("clip_labels", "Labels in the vocabulary", multiprocess_mode="liveall")
EMOJI_API_UP = Gauge("clip_emoji_api_up", "1 if the emoji API answered at the last attempt",
                     multiprocess_mode="liveall")
HEALTHY = Gauge("clip_healthy", "1 if the model is loaded and inference works",
                multiprocess_mode="liveall")


class ModelInfo:
    """clip_model_info and clip_labels for the loaded model; a reload zeroes the series it replaces."""

    def __init__(self):
        self._current: tuple[str, ...] | None = None

    def publish(self, model: str, weights_source: str, device: str, labels_version: str,
                num_labels: int) -> None:
        current = (model, weights_source, device, labels_version)
        if self._current and self._current != current:
            MODEL_INFO.labels(*self._current).set(0)
        MODEL_INFO.labels(*current).set(1)
        self._current = current
        LABELS.set(num_labels)


@contextmanager
def timed(stage: str):
    """Observe the duration of the block as one sample of clip_stage_seconds{stage=...}."""
    started = time.perf_counter()
    try:
        yield
    finally:
        STAGE_SECONDS.labels(stage).observe(time.perf_counter() - started)


def exposition() -> tuple[bytes, str]:
    """The metrics text and its content type, summed over workers in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
