"""Text features of a request's own labels (`labels=`), kept in a small LRU cache between requests.

The features depend on the prompt templates, so a change of templates (a reload) empties the cache.
Encoding new labels is the one cost a client sets with a parameter (100 long labels under 8 templates
took 22 s of CPU), so each request's new labels have a token budget (LABELS_TOKEN_BUDGET: over it,
400), one request at a time encodes (another gets 503 at once rather than a place in a queue), and the
request's deadline is checked between templates.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from clip_service.engines.base import TextEncoder
from clip_service.errors import BadInput, Overloaded
from clip_service.vocabulary.features import ensemble_features

DEFAULT_SIZE = 512
DEFAULT_TOKEN_BUDGET = 4096


def prompt_tokens(encoder: TextEncoder, prompts: list[str]) -> int:
    """Tokens the text tower reads for these prompts: what encoding them costs."""
    tokenizer = getattr(encoder, "tokenizer", None)
    if tokenizer is None:  # an engine without a tokenizer of its own: about two bytes a token
        return sum(len(prompt.encode("utf-8")) // 2 + 2 for prompt in prompts)
    return int((tokenizer(prompts) != 0).sum())  # (N, context), zero after the end of each text


class CustomLabelCache:
    """Request label -> its (D,) feature under the current templates, least recently used dropped."""

    def __init__(self, encoder: TextEncoder, size: int = DEFAULT_SIZE,
                 token_budget: int = DEFAULT_TOKEN_BUDGET):
        self.encoder = encoder
        self.size = size
        self.token_budget = token_budget
        self._encoding = threading.Lock()  # held by the one request encoding new labels
        self._features: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._templates: tuple[str, ...] = ()
        self._lock = threading.Lock()

    def features(self, labels: tuple[str, ...], templates: tuple[str, ...],
                 deadline: float | None = None) -> torch.Tensor:
        """(L, D) features of `labels` under `templates`, encoding only those not cached.

        `deadline` (time.monotonic()) bounds the encoding of new labels.
        """
        with self._lock:
            if templates != self._templates:
                self._features.clear()
                self._templates = templates
            found = {label: self._features[label] for label in labels if label in self._features}
        missing = tuple(label for label in labels if label not in found)
        if missing:  # encoded outside the lock: other requests' cached labels need not wait
            found.update(zip(missing, self._encode(missing, templates, deadline), strict=True))
        with self._lock:
            if templates == self._templates:  # else a reload changed them meanwhile: keep nothing stale
                for label in labels:
                    self._features[label] = found[label]
                    self._features.move_to_end(label)
                while len(self._features) > self.size:
                    self._features.popitem(last=False)
        return torch.stack([found[label] for label in labels])

    def _encode(self, labels: tuple[str, ...], templates: tuple[str, ...],
                deadline: float | None) -> torch.Tensor:
        cost = prompt_tokens(self.encoder, [template.format(label) for template in templates
                                            for label in labels])
        if cost > self.token_budget:
            raise BadInput(f"labels= asks to encode {len(labels)} new labels under {len(templates)} "
                           f"prompt templates: {cost} tokens, over the limit of {self.token_budget} a "
                           "request (LABELS_TOKEN_BUDGET); send fewer or shorter labels")
        if not self._encoding.acquire(blocking=False):
            raise Overloaded("Another request's labels= are being encoded; retry shortly")
        try:
            return ensemble_features(self.encoder, labels, templates, deadline)
        finally:
            self._encoding.release()
