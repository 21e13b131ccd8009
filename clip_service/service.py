"""One worker's service, wired from the settings: the rooms a request passes through, Flask-free.

The app, the gunicorn hooks and REST.py hold this object. It only builds the parts and joins them:
admission (runtime.admission), getting images (inputs.sources), the model and what runs beside it
(runtime.host), health (runtime.health), emoji (vocabulary.emoji) and classification (tasks.classify).
"""

from __future__ import annotations

from PIL import Image

from clip_service import metrics
from clip_service.engines.base import Engine
from clip_service.inputs.sources import ImageSources
from clip_service.runtime.admission import Admission
from clip_service.runtime.batching import MicroBatcher
from clip_service.runtime.health import Health
from clip_service.runtime.host import ModelHost
from clip_service.settings import Settings
from clip_service.tasks.classify import Classifier, ClassifyOptions, Prediction
from clip_service.vocabulary.emoji import emoji_mapper


class ClipService:
    """Admits requests, gets their images and classifies them with the model the host loaded."""

    def __init__(self, settings: Settings, engine: Engine | None = None):
        self.settings = settings
        self.emoji = emoji_mapper(settings)
        self.admission = Admission(settings.max_queue, settings.request_timeout)
        self.health = Health()
        self.host = ModelHost(settings, self.emoji, self.health, lambda: self.admission.in_flight, engine)
        self.images = ImageSources(settings, self._draft_size)

    def start(self) -> None:
        """Start the emoji API client, then load the model in the background."""
        self.emoji.start()
        self.host.start()

    def stop(self) -> None:
        """Stop the background threads (batcher, canary, watcher, emoji client) before exiting."""
        self.emoji.stop()
        self.host.stop()

    def wait_until_settled(self, timeout: float | None = None) -> bool:
        return self.host.wait_until_settled(timeout)

    @property
    def classifier(self) -> Classifier | None:
        return self.host.classifier

    @property
    def batcher(self) -> MicroBatcher | None:
        return self.host.batcher

    @property
    def in_flight(self) -> int:
        return self.admission.in_flight

    def ready_classifier(self) -> Classifier:
        return self.host.ready()

    def reload_labels(self) -> bool:
        return self.host.reload_labels()

    def known_groups(self) -> tuple[str, ...]:
        classifier = self.classifier
        return tuple(classifier.vocabulary.label_set.groups) if classifier else ()

    def default_options(self) -> ClassifyOptions:
        return ClassifyOptions(self.settings.confidence_threshold, self.settings.max_predictions)

    def analyze(self, image: Image.Image, deadline: float | None = None,
                options: ClassifyOptions | None = None) -> list[Prediction]:
        options = options or self.default_options()
        classifier = self.ready_classifier()
        with self.health.watching(), metrics.timed("model"):
            return classifier.classify(image, options.threshold, options.limit, deadline, options.labels,
                                       options.groups)

    def _draft_size(self) -> tuple[int, int] | None:
        classifier = self.classifier
        return classifier.engine.input_size if classifier else None
