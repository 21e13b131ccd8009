"""One worker's service, wired from the settings: the rooms a request passes through, Flask-free.

The app, the gunicorn hooks and REST.py hold this object. It only builds the parts and joins them:
admission (runtime.admission), getting images (inputs.sources), the model and what runs beside it
(runtime.host), health (runtime.health), emoji (vocabulary.emoji), classification (tasks.classify),
embeddings (tasks.embed) and photo search (tasks.search).
"""

from __future__ import annotations

import torch

from clip_service import metrics
from clip_service.engines.base import Engine
from clip_service.errors import NotFound, NotReady, ServiceError
from clip_service.inputs.sources import ImageSources
from clip_service.inputs.thumbnails import thumbnail_jpeg
from clip_service.library.photo_index import PhotoIndex
from clip_service.runtime.admission import Admission
from clip_service.runtime.batching import MicroBatcher
from clip_service.runtime.health import Health
from clip_service.runtime.host import ModelHost
from clip_service.settings import Settings
from clip_service.tasks.classify import Classifier, ClassifyOptions, Prediction
from clip_service.tasks.embed import Embedder
from clip_service.tasks.search import Match, best_matches
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

    def reload(self) -> None:
        """What SIGHUP asks for: the labels and templates, and the photo index when SEARCH_INDEX is set."""
        self.host.reload_labels()
        self.host.reload_photo_index()

    def known_groups(self) -> tuple[str, ...]:
        classifier = self.classifier
        return tuple(classifier.vocabulary.label_set.groups) if classifier else ()

    def default_options(self) -> ClassifyOptions:
        return ClassifyOptions(self.settings.confidence_threshold, self.settings.max_predictions)

    def classify(self, images: list[bytes], deadline: float, options: ClassifyOptions | None = None,
                 ) -> list[list[Prediction] | ServiceError]:
        """Each image's predictions, or the error that image alone caused; one forward pass for all.

        Every route's images come here as bytes (an upload, a file, a URL's body) and take the one
        decode-and-prepare step. A failure of the model or the deadline fails the whole request.
        """
        options = options or self.default_options()
        classifier = self.ready_classifier()
        outcomes = self.images.prepare_each(images, deadline, classifier.encoder.prepare)
        inputs = [outcome for outcome in outcomes if not isinstance(outcome, ServiceError)]
        if not inputs:
            return outcomes
        with self.health.watching(), metrics.timed("model"):
            predictions = iter(classifier.classify_prepared(inputs, options.threshold, options.limit,
                                                            deadline, options.labels, options.groups))
        return [outcome if isinstance(outcome, ServiceError) else next(predictions) for outcome in outcomes]

    def ready_embedder(self) -> Embedder:
        self.ready_classifier()
        return self.host.embedder

    def embed(self, images: list[bytes], deadline: float) -> torch.Tensor:
        """(N, D) unit embeddings of the images (bytes, as classify takes them), in one forward pass
        through the micro-batcher; one image that cannot be read fails them all."""
        embedder = self.ready_embedder()
        inputs = self.images.prepare_all(images, deadline, embedder.encoder.prepare)
        with self.health.watching(), metrics.timed("model"):
            vectors = embedder.images(inputs, deadline)
        metrics.EMBEDDINGS.labels("image").inc(len(inputs))
        return vectors

    def embed_texts(self, texts: list[str], prompts: bool, deadline: float | None = None) -> torch.Tensor:
        """(N, D) unit embeddings of the texts (with the prompt ensemble: as /analyze scores labels)."""
        embedder = self.ready_embedder()
        with self.health.watching(), metrics.timed("text"):
            vectors = embedder.texts(texts, prompts, deadline)
        metrics.EMBEDDINGS.labels("text").inc(len(texts))
        return vectors

    def photo_index(self) -> PhotoIndex:
        """The loaded SEARCH_INDEX; NotFound when search is off, NotReady while the model loads."""
        if self.settings.search_index is None:
            raise NotFound("Photo search is off: the operator sets SEARCH_INDEX to an index made with "
                           "python -m clip_service index FOLDER -o INDEX")
        self.ready_classifier()
        index = self.host.photo_index
        if index is None:
            raise NotReady("Photo search is unavailable: this worker could not read its photo index (the "
                           "service's log says why); the operator indexes again and sends SIGHUP")
        return index

    def search(self, index: PhotoIndex, query: torch.Tensor, k: int) -> list[Match]:
        """The k images of `index` (from photo_index) nearest the (D,) unit `query`, best first."""
        with metrics.timed("search"):
            return best_matches(index.embeddings, index.shown_paths, query.numpy(), k, index.approximate)

    def thumbnail(self, path: str, deadline: float | None = None) -> bytes:
        """A small JPEG of an indexed image; only paths the index holds, read beneath its folder."""
        index = self.photo_index()
        row = index.row_of_shown.get(path)
        if row is None:
            raise NotFound(f"{path[:200]} is not in the photo index")
        with metrics.timed("thumbnail"):
            return thumbnail_jpeg(index.folder, index.paths[row], self.images.limits, deadline=deadline)

    def _draft_size(self) -> tuple[int, int] | None:
        classifier = self.classifier
        return classifier.engine.input_size if classifier else None
