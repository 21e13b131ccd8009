"""The service's core, free of Flask: load once, then turn an input into predictions.

Loading runs in a background thread so `/health` can say "loading" instead of the port hanging,
and a failed load is reported as failed, never as healthy.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from clip_service.emoji import EmojiMapper, load_dictionary
from clip_service.errors import NotReady
from clip_service.image_input import ImageLimits, check_file_access, decode_image, read_file
from clip_service.labels import LabelSet, label_features, load_labels
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
    features: object  # (L, D) float32 tensor of unit label features
    emoji: EmojiMapper

    def classify(self, image: Image.Image, threshold: float, limit: int) -> list[Prediction]:
        pixels = self.engine.preprocess(image).unsqueeze(0)  # (1, 3, H, W)
        image_features = self.engine.encode_images(pixels)  # (1, D)
        probabilities = label_probabilities(image_features, self.features, self.engine.logit_scale)
        return top_predictions(probabilities[0], self.label_set.labels, threshold, limit,
                               self.emoji.emoji_for)


def build_classifier(settings: Settings, engine: ClipEngine, emoji: EmojiMapper) -> Classifier:
    label_set = load_labels(settings.labels_dir)
    features = label_features(engine, label_set, settings.prompt_template, settings.cache_dir)
    return Classifier(engine, label_set, features, emoji)


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

    def start(self) -> None:
        """Start the emoji API client, then load in the background."""
        self.emoji.start()
        threading.Thread(target=self._load, name="clip-loader", daemon=True).start()

    def wait_until_settled(self, timeout: float | None = None) -> bool:
        return self._settled.wait(timeout)

    def _load(self) -> None:
        try:
            engine = self._engine or self._engine_loader()
            self.classifier = build_classifier(self.settings, engine, self.emoji)
            self.status = LOADED
            log.info("Ready: %s on %s with %d labels", engine.name, engine.device,
                     len(self.classifier.label_set))
        except Exception as error:  # any load failure must show in /health, not kill the thread silently
            self.error = f"{type(error).__name__}: {error}"
            self.status = FAILED
            log.error("Model load failed: %s", self.error)
        finally:
            self._settled.set()

    def health(self) -> dict:
        if self.status == LOADED:
            engine = self.classifier.engine
            return {"status": "healthy", "model_status": LOADED, "device": str(engine.device),
                    "num_labels": len(self.classifier.label_set), "model": engine.name}
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

    def image_from_upload(self, data: bytes) -> Image.Image:
        return decode_image(data, self.limits)

    def image_from_file(self, raw_path: str) -> Image.Image:
        real = check_file_access(raw_path, self.settings.allowed_file_roots, self.settings.private)
        return decode_image(read_file(raw_path, real, self.limits.max_bytes), self.limits)

    def image_from_url(self, url: str) -> Image.Image:
        return decode_image(self.fetcher.fetch(url), self.limits)

    def analyze(self, image: Image.Image) -> list[Prediction]:
        return self.ready_classifier().classify(
            image, self.settings.confidence_threshold, self.settings.max_predictions)
