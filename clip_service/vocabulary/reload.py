"""Loading the vocabulary from the settings, and reloading it while requests run.

A reload encodes only the labels whose text is new (with the same templates), and a vocabulary that
fails to load (no labels, a bad template) keeps the current one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from clip_service.engines.base import TextEncoder
from clip_service.settings import Settings
from clip_service.vocabulary.features import Vocabulary, build_vocabulary
from clip_service.vocabulary.labels import LabelsError, load_labels, load_templates

log = logging.getLogger(__name__)


def load_vocabulary(settings: Settings, encoder: TextEncoder, previous: Vocabulary | None = None,
                    ) -> Vocabulary:
    """The labels and prompt templates from disk, with features (reusing `previous` where it can)."""
    label_set = load_labels(settings.labels_dir)
    templates = load_templates(settings.prompts_file, settings.prompt_template)
    reuse = previous.features_by_text() if previous and previous.templates == templates else None
    return build_vocabulary(encoder, label_set, templates, settings.cache_dir, reuse)


class LabelReloader:
    """Re-reads the vocabulary and hands it to `use`; one reload at a time (SIGHUP, the watcher, tests)."""

    def __init__(self, settings: Settings, encoder: TextEncoder, current: Callable[[], Vocabulary],
                 use: Callable[[Vocabulary], None]):
        self.settings = settings
        self.encoder = encoder
        self.current = current
        self.use = use
        self._lock = threading.Lock()

    def reload(self) -> bool:
        """True when a new vocabulary is in use; False (logged) when the current one was kept."""
        with self._lock:
            current = self.current()
            try:
                vocabulary = load_vocabulary(self.settings, self.encoder, current)
            except (LabelsError, OSError) as error:
                log.error("Label reload failed, keeping version %s: %s", current.version, error)
                return False
            except Exception:  # a reload must never take the serving vocabulary (or its caller) down
                log.exception("Label reload failed unexpectedly, keeping version %s", current.version)
                return False
            self.use(vocabulary)
        log.info("Labels reloaded: %d labels, version %s", len(vocabulary.label_set), vocabulary.version)
        return True
