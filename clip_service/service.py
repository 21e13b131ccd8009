"""The service's core, free of Flask: load once, then turn an input into predictions.

Loading runs in a background thread so `/health` can say "loading" instead of the port hanging,
and a failed load is reported as failed, never as healthy.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from PIL import Image

from clip_service import metrics
from clip_service.batching import MicroBatcher
from clip_service.emoji import EmojiMapper, load_dictionary
from clip_service.errors import DeadlineExceeded, NotReady, Overloaded, ServiceError
from clip_service.image_input import ImageLimits, check_file_access, decode_image, read_file
from clip_service.labels import (
    LabelsError,
    LabelSet,
    Vocabulary,
    build_vocabulary,
    ensemble_features,
    load_labels,
    load_templates,
)
from clip_service.model import ClipEngine, load_engine
from clip_service.options import AnalyzeOptions
from clip_service.scoring import Prediction, label_probabilities, top_predictions
from clip_service.settings import Settings
from clip_service.url_fetch import UrlFetcher

log = logging.getLogger(__name__)

LOADING, LOADED, FAILED = "loading", "loaded", "failed"


class Classifier:
    """A loaded engine with its vocabulary: everything a request needs.

    The vocabulary can be swapped (a label reload) while requests run; each request reads it once.
    """

    def __init__(self, engine: ClipEngine, vocabulary: Vocabulary, emoji: EmojiMapper,
                 batcher: MicroBatcher | None = None, custom_cache_size: int = 512):
        self.engine = engine
        self.vocabulary = vocabulary
        self.emoji = emoji
        self.batcher = batcher
        self._custom: OrderedDict[str, torch.Tensor] = OrderedDict()  # request label -> (D,) feature
        self._custom_size = custom_cache_size
        self._custom_lock = threading.Lock()

    @property
    def label_set(self) -> LabelSet:
        return self.vocabulary.label_set

    @property
    def features(self) -> torch.Tensor:
        return self.vocabulary.features

    def image_features(self, image: Image.Image, timeout: float | None = None) -> torch.Tensor:
        """(D,) unit feature of one image, through the micro-batcher when there is one."""
        pixels = self.engine.prepare(image)  # (3, H, W)
        if self.batcher is None:
            return self.engine.encode_images(pixels.unsqueeze(0))[0]
        return self.batcher.submit(pixels, timeout)

    def custom_features(self, labels: tuple[str, ...]) -> torch.Tensor:
        """(L, D) features of a request's own labels, with the vocabulary's templates, LRU-cached."""
        templates = self.vocabulary.templates
        with self._custom_lock:
            missing = [label for label in labels if label not in self._custom]
        if missing:
            encoded = ensemble_features(self.engine, tuple(missing), templates)
            with self._custom_lock:
                self._custom.update(zip(missing, encoded, strict=True))
        with self._custom_lock:
            for label in labels:
                self._custom.move_to_end(label)
            features = torch.stack([self._custom[label] for label in labels])
            while len(self._custom) > self._custom_size:
                self._custom.popitem(last=False)
        return features

    def candidates(self, labels: tuple[str, ...] | None = None, groups: tuple[str, ...] | None = None,
                   ) -> tuple[tuple[str, ...], torch.Tensor]:
        """The labels to score against and their (L, D) features."""
        vocabulary = self.vocabulary
        if labels is not None:
            return labels, self.custom_features(labels)
        if groups is not None:
            group_rows = vocabulary.group_rows
            rows = list(dict.fromkeys(row for group in groups for row in group_rows.get(group, ())))
            return tuple(vocabulary.label_set.labels[row] for row in rows), vocabulary.features[rows]
        return vocabulary.label_set.labels, vocabulary.features

    def classify(self, image: Image.Image, threshold: float, limit: int, timeout: float | None = None,
                 labels: tuple[str, ...] | None = None, groups: tuple[str, ...] | None = None,
                 ) -> list[Prediction]:
        names, label_features = self.candidates(labels, groups)
        if not names:
            return []
        image_features = self.image_features(image, timeout).unsqueeze(0)  # (1, D)
        return self._predictions(image_features, names, label_features, threshold, limit)[0]

    def classify_many(self, images: list[Image.Image], threshold: float, limit: int,
                      ) -> list[list[Prediction]]:
        """Several images in one forward pass against the vocabulary (the tagger's batches)."""
        pixels = torch.stack([self.engine.prepare(image) for image in images])  # (N, 3, H, W)
        vocabulary = self.vocabulary
        return self._predictions(self.engine.encode_images(pixels), vocabulary.label_set.labels,
                                 vocabulary.features, threshold, limit)

    def _predictions(self, image_features: torch.Tensor, names: tuple[str, ...],
                     label_features: torch.Tensor, threshold: float, limit: int,
                     ) -> list[list[Prediction]]:
        """(N, D) image features -> each image's predictions."""
        probabilities = label_probabilities(image_features, label_features, self.engine.logit_scale,
                                            self.engine.logit_bias)
        return [top_predictions(row, names, threshold, limit, self.emoji.emoji_for)
                for row in probabilities]


def load_vocabulary(settings: Settings, engine: ClipEngine, previous: Vocabulary | None = None,
                    ) -> Vocabulary:
    """The labels and prompt templates from disk, with features (reusing `previous` where it can)."""
    label_set = load_labels(settings.labels_dir)
    templates = load_templates(settings.prompts_file, settings.prompt_template)
    reuse = previous.features_by_text() if previous and previous.templates == templates else None
    return build_vocabulary(engine, label_set, templates, settings.cache_dir, reuse)


def build_classifier(settings: Settings, engine: ClipEngine, emoji: EmojiMapper) -> Classifier:
    return Classifier(engine, load_vocabulary(settings, engine), emoji)


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
            lambda: load_engine(settings.model_spec, settings.device, settings.precision))
        self._settled = threading.Event()
        self._stopped = threading.Event()
        self.inference_error: str | None = None  # set by a failing canary or request, cleared by success
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self._model_info_labels: tuple[str, ...] | None = None

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @contextlib.contextmanager
    def admitted(self, arrived: float | None = None) -> Iterator[float]:
        """Admission control: hold a place for one request, or refuse at once when full.

        Yields the request's deadline (time.monotonic() based): REQUEST_TIMEOUT after `arrived`,
        when the server says when the request arrived, else from now.
        """
        now = time.monotonic()
        deadline = (now if arrived is None else arrived) + self.settings.request_timeout
        if now >= deadline:
            raise DeadlineExceeded(f"The request waited {now - arrived:.1f} s for a free thread, past "
                                   f"REQUEST_TIMEOUT={self.settings.request_timeout:g} s; retry later")
        with self._in_flight_lock:
            if self._in_flight >= self.settings.max_queue:
                raise Overloaded(f"The service is busy ({self._in_flight} requests in progress, "
                                 f"MAX_QUEUE={self.settings.max_queue}); retry shortly")
            self._in_flight += 1
        metrics.IN_FLIGHT.inc()
        try:
            yield deadline
        finally:
            metrics.IN_FLIGHT.dec()
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
                self.settings.batch_wait_ms / 1000, arriving=lambda: self._in_flight,
                on_batch=metrics.BATCH_SIZE.observe)
            self.classifier = classifier
            self._publish_model_metrics()
            if self.settings.health_canary_seconds > 0:
                threading.Thread(target=self._canary_loop, name="clip-canary", daemon=True).start()
            if self.settings.labels_watch:
                self.watch_labels()
            self.status = LOADED
            log.info("Ready: %s on %s with %d labels", engine.name, engine.device,
                     len(self.classifier.label_set))
        except Exception as error:  # any load failure must show in /health, not kill the thread silently
            self.error = f"{type(error).__name__}: {error}"
            self.status = FAILED
            log.error("Model load failed: %s", self.error)
        finally:
            metrics.HEALTHY.set(1 if self.status == LOADED else 0)
            self._settled.set()

    def _publish_model_metrics(self) -> None:
        engine, vocabulary = self.classifier.engine, self.classifier.vocabulary
        current = (engine.name, engine.framework, str(engine.device), vocabulary.version)
        if self._model_info_labels and self._model_info_labels != current:
            metrics.MODEL_INFO.labels(*self._model_info_labels).set(0)  # a reload replaced it
        metrics.MODEL_INFO.labels(*current).set(1)
        self._model_info_labels = current
        metrics.LABELS.set(len(vocabulary.label_set))

    def reload_labels(self) -> bool:
        """Re-read labels and templates; encode only what changed; swap without stopping requests.

        A vocabulary that fails to load (no labels, a bad template) keeps the current one.
        """
        classifier = self.classifier
        if classifier is None:
            return False
        with self._reload_lock:
            try:
                vocabulary = load_vocabulary(self.settings, classifier.engine, classifier.vocabulary)
            except (LabelsError, OSError) as error:
                log.error("Label reload failed, keeping version %s: %s",
                          classifier.vocabulary.version, error)
                return False
            if vocabulary.templates != classifier.vocabulary.templates:
                classifier = Classifier(classifier.engine, vocabulary, classifier.emoji,
                                        classifier.batcher)
                self.classifier = classifier
            else:
                classifier.vocabulary = vocabulary
            self._publish_model_metrics()
        log.info("Labels reloaded: %d labels, version %s", len(vocabulary.label_set), vocabulary.version)
        return True

    def watch_labels(self, interval: float = 2.0) -> None:
        """Reload when a file in the labels folder or the prompts file changes (CLIP_LABELS_WATCH)."""
        threading.Thread(target=self._watch_loop, args=(interval, self._labels_signature()),
                         name="clip-labels-watch", daemon=True).start()

    def _watch_loop(self, interval: float, last: tuple) -> None:
        while not self._stopped.wait(interval):
            current = self._labels_signature()
            if current != last and self.status == LOADED and self.reload_labels():
                last = current

    def _labels_signature(self) -> tuple:
        paths = sorted(Path(self.settings.labels_dir).glob("*.txt")) + [Path(self.settings.prompts_file)]
        signature = []
        for path in paths:
            with contextlib.suppress(OSError):
                stat = path.stat()
                signature.append((str(path), stat.st_mtime_ns, stat.st_size))
        return tuple(signature)

    def stop(self) -> None:
        """Stop the background threads (canary, watcher, emoji client, batcher) before exiting."""
        self._stopped.set()
        self.emoji.stop()
        if self.classifier is not None and self.classifier.batcher is not None:
            self.classifier.batcher.stop()

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
        metrics.HEALTHY.set(1)
        return True

    def _inference_failed(self, error: BaseException) -> None:
        if self.inference_error is None:
            log.error("Inference failed: %s: %s", type(error).__name__, error, exc_info=error)
        self.inference_error = f"{type(error).__name__}: {error}"
        metrics.HEALTHY.set(0)

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
        classifier = self.ready_classifier()
        engine = classifier.engine
        return {"framework": engine.framework, "model": engine.name, "device": str(engine.device),
                "labels_version": classifier.vocabulary.version}

    def labels_listing(self) -> dict:
        """The loaded vocabulary grouped by file, each label with its emoji."""
        vocabulary = self.ready_classifier().vocabulary
        emoji_for = self.emoji.emoji_for
        groups = {
            group: [{"label": label, **({"emoji": e} if (e := emoji_for(label)) else {})}
                    for label in labels]
            for group, labels in vocabulary.label_set.groups.items()
        }
        return {"version": vocabulary.version, "num_labels": len(vocabulary.label_set),
                "templates": list(vocabulary.templates), "groups": groups}

    def known_groups(self) -> tuple[str, ...]:
        classifier = self.classifier
        return tuple(classifier.vocabulary.label_set.groups) if classifier else ()

    def _draft_size(self) -> tuple[int, int] | None:
        return self.classifier.engine.input_size if self.classifier else None

    def _decode(self, data: bytes) -> Image.Image:
        with metrics.timed("decode"):
            return decode_image(data, self.limits, self._draft_size())

    def image_from_upload(self, data: bytes) -> Image.Image:
        return self._decode(data)

    def image_from_file(self, raw_path: str) -> Image.Image:
        real = check_file_access(raw_path, self.settings.allowed_file_roots, self.settings.private)
        with metrics.timed("fetch"):
            data = read_file(raw_path, real, self.limits.max_bytes, self.settings.allowed_file_roots)
        return self._decode(data)

    def image_from_url(self, url: str, deadline: float | None = None) -> Image.Image:
        with metrics.timed("fetch"):
            data = self.fetcher.fetch(url, deadline)
        return self._decode(data)

    def default_options(self) -> AnalyzeOptions:
        return AnalyzeOptions(self.settings.confidence_threshold, self.settings.max_predictions)

    def analyze(self, image: Image.Image, deadline: float | None = None,
                options: AnalyzeOptions | None = None) -> list[Prediction]:
        options = options or self.default_options()
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            with metrics.timed("model"):
                predictions = self.ready_classifier().classify(
                    image, options.threshold, options.limit, timeout, options.labels, options.groups)
        except ServiceError:
            raise
        except Exception as error:  # a broken device: health must say so until inference works
            self._inference_failed(error)
            raise NotReady("The model failed on this image; the service is checking its device "
                           "(see /health); retry shortly") from error
        if self.inference_error:
            self.inference_error = None
            metrics.HEALTHY.set(1)
        return predictions
