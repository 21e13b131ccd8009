"""The model in this worker: loaded in the background, with what runs beside it, and stopped as one.

Loading runs in a background thread so `/health` can say "loading" instead of the port hanging, and a
failed load is reported as failed, never as healthy. Once loaded, the host runs the micro-batcher, the
health canary and (CLIP_LABELS_WATCH) the labels watcher, and reloads the labels when asked. With
SEARCH_INDEX it also loads the photo index, which must come from the same model.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

from clip_service import metrics
from clip_service.engines.base import Engine
from clip_service.engines.registry import default_batch_size, engine_for_settings
from clip_service.engines.spec import model_identity, public_model_name
from clip_service.errors import NotReady, without_server_paths
from clip_service.library.photo_index import PhotoIndex, PhotoIndexError, read_model_index
from clip_service.runtime.batching import MicroBatcher
from clip_service.runtime.health import Canary, Health
from clip_service.settings import Settings
from clip_service.tasks.classify import Classifier, EmojiSource
from clip_service.tasks.embed import Embedder
from clip_service.tasks.encode import Encoder
from clip_service.vocabulary.custom_labels import CustomLabelCache
from clip_service.vocabulary.features import Vocabulary
from clip_service.vocabulary.reload import LabelReloader, load_vocabulary
from clip_service.vocabulary.watcher import LabelsWatcher

log = logging.getLogger(__name__)

LOADING, LOADED, FAILED = "loading", "loaded", "failed"


class Stoppable(Protocol):
    def stop(self) -> None: ...


class ModelHost:
    """Loads the engine and its classifier once, says how far that got, and stops what it started."""

    def __init__(self, settings: Settings, emoji: EmojiSource, health: Health,
                 arriving: Callable[[], int] = lambda: 0, engine: Engine | None = None):
        self.settings = settings
        self.emoji = emoji
        self.health = health
        self.arriving = arriving  # requests that may soon submit an image (admission's in_flight)
        self.status = LOADING
        self.error: str | None = None
        self.classifier: Classifier | None = None
        self.batcher: MicroBatcher | None = None
        self.encoder: Encoder | None = None
        self.embedder: Embedder | None = None
        self.photo_index: PhotoIndex | None = None  # SEARCH_INDEX, once loaded
        self._index_lock = threading.Lock()
        self._engine = engine
        self._reloader: LabelReloader | None = None
        self._model_info = metrics.ModelInfo()
        self._settled = threading.Event()
        self._running: list[Stoppable] = []
        self._stopping = False
        self._lock = threading.Lock()

    def start(self) -> None:
        threading.Thread(target=self._load, name="clip-loader", daemon=True).start()

    def wait_until_settled(self, timeout: float | None = None) -> bool:
        return self._settled.wait(timeout)

    def ready(self) -> Classifier:
        """The loaded classifier, or NotReady saying why there is none."""
        if self.status == LOADED:
            return self.classifier
        if self.status == FAILED:
            raise NotReady(f"The model failed to load: {without_server_paths(self.error)}")
        raise NotReady("The model is still loading; retry in a few seconds")

    def reload_labels(self) -> bool:
        """Re-read labels and templates; encode only what changed; swap without stopping requests."""
        return self._reloader is not None and self._reloader.reload()

    def reload_photo_index(self) -> bool:
        """Re-read SEARCH_INDEX (after `python -m clip_service index` wrote it again) and swap it in.

        An index that cannot be used (damaged, missing, another model's) leaves the one in use serving.
        """
        if self.settings.search_index is None or self.status != LOADED:
            return False
        return self._use_photo_index(self.classifier.vocabulary.features.shape[1])

    def _use_photo_index(self, dimensions: int) -> bool:
        """Read SEARCH_INDEX and serve it; one that cannot be used is logged and leaves what served before
        (at a worker's start: nothing, so photo search alone answers 503 until a good one is loaded)."""
        with self._index_lock:  # two SIGHUPs around a rewrite must not finish in the wrong order
            try:
                index = load_photo_index(self.settings, dimensions)
            except Exception as error:  # any index that cannot be used costs photo search only
                if not isinstance(error, PhotoIndexError):
                    log.debug("Reading the photo index failed unexpectedly", exc_info=True)
                if self.photo_index:
                    log.warning("The photo index was not reloaded; the one loaded before keeps serving: %s",
                                error)
                else:
                    log.error("Photo search is unavailable until the index is mended and SIGHUP sent: %s",
                              error)
                return False
            self.photo_index = index
        return True

    def stop(self) -> None:
        """Stop the batcher, canary and watcher (a thread inside torch at exit aborts the process)."""
        with self._lock:
            self._stopping = True
            running, self._running = self._running, []
        for part in running:
            part.stop()

    def _load(self) -> None:
        try:
            self._build()
            self.status = LOADED
            engine = self.classifier.engine
            log.info("Ready: %s (%s weights) on %s with %s in %s, %d labels", engine.name,
                     engine.weights_source, engine.device_name, engine.backend, engine.precision,
                     len(self.classifier.label_set))
        except Exception as error:  # any load failure must show in /health, not kill the thread silently
            self.error = f"{type(error).__name__}: {error}"
            self.status = FAILED
            log.error("Model load failed: %s", self.error)
        finally:
            self.health.model_settled(self.status == LOADED)
            self._settled.set()

    def _build(self) -> None:
        settings = self.settings
        engine = self._engine or engine_for_settings(settings)
        vocabulary = load_vocabulary(settings, engine)
        batcher = MicroBatcher(engine.encode_images, settings.batch_max_size or default_batch_size(engine),
                               settings.batch_wait_ms / 1000, arriving=self.arriving,
                               on_batch=metrics.BATCH_SIZE.observe)
        self._keep(batcher)
        budget = settings.labels_token_budget
        encoder = Encoder(engine, batcher.submit_many, CustomLabelCache(engine, token_budget=budget),
                          CustomLabelCache(engine, token_budget=budget))
        classifier = Classifier(encoder, vocabulary, self.emoji)
        embedder = Embedder(encoder, lambda: classifier.vocabulary)
        self.batcher, self.encoder, self.embedder, self.classifier = batcher, encoder, embedder, classifier
        self._reloader = LabelReloader(settings, engine, lambda: classifier.vocabulary, self._use_vocabulary)
        self._publish(vocabulary)
        if settings.search_index is not None:
            # the index was checked before the workers started; one that has gone bad since (a worker
            # restarting later) costs photo search only, until SIGHUP loads a good one
            self._use_photo_index(vocabulary.features.shape[1])
        if settings.health_canary_seconds > 0:
            self._keep(Canary(classifier.image_features, engine.input_size, settings.health_canary_seconds,
                              settings.request_timeout, self.health), start=True)
        if settings.labels_watch:
            self._keep(LabelsWatcher(settings.labels_dir, settings.prompts_file, self.reload_labels),
                       start=True)

    def _keep(self, part, start: bool = False) -> None:
        """Run `part` until stop; after stop (a load that finished late) it is stopped at once."""
        with self._lock:
            if not self._stopping:
                self._running.append(part)
                if start:
                    part.start()
                return
        part.stop()

    def _use_vocabulary(self, vocabulary: Vocabulary) -> None:
        self.classifier.vocabulary = vocabulary
        self._publish(vocabulary)

    def _publish(self, vocabulary: Vocabulary) -> None:
        engine = self.classifier.engine
        self._model_info.publish(public_model_name(engine.name), engine.weights_source, engine.device_name,
                                 vocabulary.version, len(vocabulary.label_set))


def load_photo_index(settings: Settings, dimensions: int) -> PhotoIndex:
    """SEARCH_INDEX, checked against CLIP_MODEL and its `dimensions` (PhotoIndexError otherwise), its
    vectors read once.

    Reading every page now puts the vectors in the page cache (shared by the workers), so the first
    search is as fast as the others.
    """
    index = read_model_index(settings.search_index, settings.clip_model, model_identity(settings.model_spec))
    if index.dimensions != dimensions:
        raise PhotoIndexError(f"{settings.search_index} holds {index.dimensions}-dimensional vectors and "
                              f"CLIP_MODEL={settings.clip_model} makes {dimensions}; index again")
    float(index.embeddings.sum())  # touch every page
    metrics.SEARCH_INDEX_IMAGES.set(len(index.paths))
    log.info("Photo index %s: %d images of %s", settings.search_index, len(index.paths), index.folder)
    return index
