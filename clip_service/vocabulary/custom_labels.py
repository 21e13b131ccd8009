"""Text features of a request's own labels (`labels=`), kept in a small LRU cache between requests.

The features depend on the prompt templates, so a change of templates (a reload) empties the cache.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from clip_service.engines.base import TextEncoder
from clip_service.vocabulary.features import ensemble_features

DEFAULT_SIZE = 512


class CustomLabelCache:
    """Request label -> its (D,) feature under the current templates, least recently used dropped."""

    def __init__(self, encoder: TextEncoder, size: int = DEFAULT_SIZE):
        self.encoder = encoder
        self.size = size
        self._features: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._templates: tuple[str, ...] = ()
        self._lock = threading.Lock()

    def features(self, labels: tuple[str, ...], templates: tuple[str, ...]) -> torch.Tensor:
        """(L, D) features of `labels` under `templates`, encoding only those not cached."""
        with self._lock:
            if templates != self._templates:
                self._features.clear()
                self._templates = templates
            found = {label: self._features[label] for label in labels if label in self._features}
        missing = tuple(label for label in labels if label not in found)
        if missing:  # encoded outside the lock: other requests' cached labels need not wait
            found.update(zip(missing, ensemble_features(self.encoder, missing, templates), strict=True))
        with self._lock:
            if templates == self._templates:  # else a reload changed them meanwhile: keep nothing stale
                for label in labels:
                    self._features[label] = found[label]
                    self._features.move_to_end(label)
                while len(self._features) > self.size:
                    self._features.popitem(last=False)
        return torch.stack([found[label] for label in labels])
