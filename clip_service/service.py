"""The service's core, free of Flask: load once, then turn an input into predictions.

Loading runs in a background thread so `/health` can say "loading" instead of the port hanging,
and a failed load is reported as failed, never as healthy.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from PIL import Image

from clip_service.batching import MicroBatcher
from clip_service.emoji import EmojiMapper, load_dictionary
from clip_service.errors import NotReady, Overloaded, ServiceError
from clip_service.image_input import ImageLimits, check_file_access, decode_image, read_file
from clip_service.labels import LabelSet, label_features, load_labels, load_templates
from clip_service.model import ClipEngine, load_engine
from clip_service.scoring import Prediction, label_probabilities, top_predictions
from clip_service.settings import Settings
from clip_service.url_fetch import UrlFetcher

log = logging.getLogger(__name__)

LOADING, LOADED, FAILED = "loading", "loaded", "failed"


@dataclass
class Classifier:
    """A loaded engine with its label features: everything a request needs."""

    engine: ClipEngine
    label_set: LabelSet
    features: torch.Tensor  # (L, D) float32 unit label features
    emoji: EmojiMapper
    batcher: MicroBatcher | None = None

    def image_features(self, image: Image.Image, timeout: float | None = None) -> torch.Tensor:
        """(D,) unit feature of one image, through the micro-batcher when there is one."""
        pixels = self.engine.prepare(image)  # (3, H, W)
        if self.batcher is None:
            return self.engine.encode_images(pixels.unsqueeze(0))[0]
        return self.batcher.submit(pixels, timeout)

    def classify(self, image: Image.Image, threshold: float, limit: int,
                 timeout: float | None = None) -> list[Prediction]:
        image_features = self.image_features(image, timeout).unsqueeze(0)  # (1, D)
        probabilities = label_probabilities(image_features, self.features, self.engine.logit_scale)
        return top_predictions(probabilities[0], self.label_set.labels, threshold, limit,
                               self.emoji.emoji_for)


def build_classifier(settings: Settings, engine: ClipEngine, emoji: EmojiMapper) -> Classifier:
    label_set = load_labels(settings.labels_dir)
    templates = load_templates(settings.prompts_file, settings.prompt_template)
    features = label_features(engine, label_set, templates, settings.cache_dir)
    return Classifier(engine, label_set, features, emoji)


def default_batch_size(engine: ClipEngine) -> int:
    return 64 if engine.device.type == "cuda" else 8


def emoji_mapper(settings: Settings) -> EmojiMapper:
    api_url = f"http://{settings.api_host}:{settings.api_port}/emoji_mappings.json"
    return EmojiMapper(load_dictionary(settings.emoji_dictionary), api_url, settings.api_timeout,
                       settings.emoji_retry_seconds)


class ClipService:
    """Owns the loading state and answers `analyze` calls once loaded."""

    def __init__(self, settings: Settings, engine: ClipEngine | None = None,
                 engine_loader: Callable[[], ClipEngine] | None = None):
        self.settings = settings
        self.status = LOADING
        self.error: str | None = None
        self.classifier: Classifier | None = None
        self.emoji = emoji_mapper(settings)
        self.limits = ImageLimits(settings.max_image_bytes, settings.max_image_pixels)
        self.fetcher = UrlFetcher(settings.max_image_bytes, settings.url_timeout,
                                  settings.url_allowlist)
        self._engine = engine
        self._engine_loader = engine_loader or (
            lambda: load_engine(settings.model_spec, settings.device))
        self._settled = threading.Event()
        self._stopped = threading.Event()
        self.inference_error: str | None = None  # set by a failing canary or request, cleared by success
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @contextlib.contextmanager
    def admitted(self) -> Iterator[float]:
        """Admission control: hold a place for one request, or refuse at once when full.

        Yields the request's deadline (time.monotonic() based).
        """
        with self._in_flight_lock:
            if self._in_flight >= self.settings.max_queue:
                raise Overloaded(f"The service is busy ({self._in_flight} requests in progress, "
                                 f"MAX_QUEUE={self.settings.max_queue}); retry shortly")
            self._in_flight += 1
        try:
            yield time.monotonic() + self.settings.request_timeout
        finally:
            with self._in_flight_lock:
                self._in_flight -= 1

    def start(self) -> None:
        """Start the emoji API client, then load in the background."""
        self.emoji.start()
        threading.Thread(target=self._load, name="clip-loader", daemon=True).start()

    def wait_until_settled(self, timeout: float | None = None) -> bool:
        return self._settled.wait(timeout)

    def _load(self) -> None:
        try:
            engine = self._engine or self._engine_loader()
            classifier = build_classifier(self.settings, engine, self.emoji)
            classifier.batcher = MicroBatcher(
                engine.encode_images, self.settings.batch_max_size or default_batch_size(engine),
                self.settings.batch_wait_ms / 1000, arriving=lambda: self._in_flight)
            self.classifier = classifier
            if self.settings.health_canary_seconds > 0:
                threading.Thread(target=self._canary_loop, name="clip-canary", daemon=True).start()
            self.status = LOADED
            log.info("Ready: %s on %s with %d labels", engine.name, engine.device,
                     len(self.classifier.label_set))
        except Exception as error:  # any load failure must show in /health, not kill the thread silently
            self.error = f"{type(error).__name__}: {error}"
            self.status = FAILED
            log.error("Model load failed: %s", self.error)
        finally:
            self._settled.set()

    def stop(self) -> None:
        self._stopped.set()
        self.emoji.stop()

    def _canary_loop(self) -> None:
        """Readiness that means something: a tiny inference every HEALTH_CANARY_SECONDS.

        While inference fails the canary runs every second, so health recovers promptly.
        """
        probe = Image.new("RGB", self.classifier.engine.input_size[::-1], (128, 128, 128))
        interval = self.settings.health_canary_seconds
        while not self._stopped.wait(min(interval, 1.0) if self.inference_error else interval):
            self.check_inference(probe)

    def check_inference(self, image: Image.Image) -> bool:
        try:
            features = self.classifier.image_features(image, timeout=self.settings.request_timeout)
            if not bool(torch.isfinite(features).all()):
                raise RuntimeError("the model returned non-finite features")
        except Exception as error:  # whatever broke inference is what health must report
            self._inference_failed(error)
            return False
        if self.inference_error:
            log.warning("Inference works again")
        self.inference_error = None
        return True

    def _inference_failed(self, error: BaseException) -> None:
        if self.inference_error is None:
            log.error("Inference failed: %s: %s", type(error).__name__, error)
        self.inference_error = f"{type(error).__name__}: {error}"

    def health(self) -> dict:
        if self.status == LOADED:
            engine = self.classifier.engine
            body = {"status": "healthy", "model_status": LOADED, "device": str(engine.device),
                    "num_labels": len(self.classifier.label_set), "model": engine.name}
            if self.inference_error:
                body.update(status="unhealthy", error=f"Inference is failing: {self.inference_error}")
            return body
        body = {"status": "unhealthy", "model_status": self.status, "device": None, "num_labels": 0}
        if self.error:
            body["error"] = self.error
        return body

    def ready_classifier(self) -> Classifier:
        if self.status == LOADED:
            return self.classifier
        if self.status == FAILED:
            raise NotReady(f"The model failed to load: {self.error}")
        raise NotReady("The model is still loading; retry in a few seconds")

    def model_info(self) -> dict:
        engine = self.ready_classifier().engine
        return {"framework": engine.framework, "model": engine.name, "device": str(engine.device)}

    def _draft_size(self) -> tuple[int, int] | None:
        return self.classifier.engine.input_size if self.classifier else None

    def image_from_upload(self, data: bytes) -> Image.Image:
        return decode_image(data, self.limits, self._draft_size())

    def image_from_file(self, raw_path: str) -> Image.Image:
        real = check_file_access(raw_path, self.settings.allowed_file_roots, self.settings.private)
        return decode_image(read_file(raw_path, real, self.limits.max_bytes), self.limits,
                            self._draft_size())

    def image_from_url(self, url: str, deadline: float | None = None) -> Image.Image:
        return decode_image(self.fetcher.fetch(url, deadline), self.limits, self._draft_size())

    def analyze(self, image: Image.Image, deadline: float | None = None) -> list[Prediction]:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            predictions = self.ready_classifier().classify(
                image, self.settings.confidence_threshold, self.settings.max_predictions, timeout)
        except ServiceError:
            raise
        except Exception as error:  # a broken device: health must say so until inference works
            self._inference_failed(error)
            raise
        self.inference_error = None
        return predictions
