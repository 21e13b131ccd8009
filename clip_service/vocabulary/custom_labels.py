"""Text features of a request's own labels (`labels=`), kept in a small LRU cache between requests.

The features depend on the prompt templates, so a change of templates (a reload) empties the cache.
Encoding new labels is the one cost a client sets with a parameter (100 long labels under 8 templates
took 22 s of CPU), so each request's new labels have a token budget (LABELS_TOKEN_BUDGET: over it,
400), one request at a time encodes, and the request's deadline is checked between templates.

Requests that ask for the same new labels at once (a client's thread pool) wait for the one encoding
of them (single flight) rather than each encoding them or being refused; a request with other new
labels waits for the one encoding in progress, and is refused (503) only when it could not start and
finish before its deadline.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from clip_service.engines.base import TextEncoder
from clip_service.errors import BadInput, DeadlineExceeded, Overloaded
from clip_service.vocabulary.features import ensemble_features

DEFAULT_SIZE = 512
DEFAULT_TOKEN_BUDGET = 4096


def prompt_tokens(encoder: TextEncoder, prompts: list[str]) -> int:
    """Tokens the text tower reads for these prompts: what encoding them costs."""
    tokenizer = getattr(encoder, "tokenizer", None)
    if tokenizer is None:  # an engine without a tokenizer of its own: about two bytes a token
        return sum(len(prompt.encode("utf-8")) // 2 + 2 for prompt in prompts)
    return int((tokenizer(prompts) != 0).sum())  # (N, context), zero after the end of each text


@dataclass
class _Flight:
    """One encoding of new labels that other requests asking for the same ones wait for."""

    done: threading.Event = field(default_factory=threading.Event)
    features: dict[str, torch.Tensor] | None = None  # None once done: it failed
    refusal: BadInput | None = None  # it failed for what the labels are (over the budget): so would all


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
        self._flights: dict[tuple[frozenset[str], tuple[str, ...]], _Flight] = {}
        self._tokens_per_second = 0.0  # as encodings have been timed; 0 before the first

    def features(self, labels: tuple[str, ...], templates: tuple[str, ...],
                 deadline: float | None = None, asked_by: str = "labels=") -> torch.Tensor:
        """(L, D) features of `labels` under `templates`, encoding only those not cached.

        `deadline` (time.monotonic()) bounds the encoding of new labels; `asked_by` names the request's
        parameter in messages (/embed's texts share this cache and budget).
        """
        with self._lock:
            if templates != self._templates:
                self._features.clear()
                self._templates = templates
            found = {label: self._features[label] for label in labels if label in self._features}
        missing = tuple(label for label in labels if label not in found)
        if missing:  # encoded outside the lock: other requests' cached labels need not wait
            found.update(self._shared(missing, templates, deadline, asked_by))
        with self._lock:
            if templates == self._templates:  # else a reload changed them meanwhile: keep nothing stale
                for label in labels:
                    self._features[label] = found[label]
                    self._features.move_to_end(label)
                while len(self._features) > self.size:
                    self._features.popitem(last=False)
        return torch.stack([found[label] for label in labels])

    def _shared(self, labels: tuple[str, ...], templates: tuple[str, ...], deadline: float | None,
                asked_by: str) -> dict[str, torch.Tensor]:
        """The features of new labels: encoded here, or by the request already encoding the same ones."""
        key = (frozenset(labels), templates)
        while True:
            with self._lock:
                flight = self._flights.get(key)
                leading = flight is None
                if leading:
                    flight = self._flights[key] = _Flight()
            if leading:
                break
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not flight.done.wait(left):
                raise DeadlineExceeded(f"The request's time ran out while another request was encoding the "
                                       f"same {asked_by} (REQUEST_TIMEOUT); retry: they will be cached")
            if flight.features is not None:
                return flight.features
            if flight.refusal is not None:
                raise BadInput(flight.refusal.message)
            # that encoding failed on its own account (its deadline, a fault): this request tries itself
        try:
            flight.features = dict(zip(labels, self._encode(labels, templates, deadline, asked_by),
                                       strict=True))
            return flight.features
        except BadInput as refusal:
            flight.refusal = refusal
            raise
        finally:
            with self._lock:
                del self._flights[key]
            flight.done.set()

    def _encode(self, labels: tuple[str, ...], templates: tuple[str, ...],
                deadline: float | None, asked_by: str) -> torch.Tensor:
        cost = prompt_tokens(self.encoder, [template.format(label) for template in templates
                                            for label in labels])
        if cost > self.token_budget:
            raise BadInput(f"{asked_by} asks to encode {len(labels)} new texts under {len(templates)} "
                           f"prompt template(s): {cost} tokens, over the limit of {self.token_budget} a "
                           "request (LABELS_TOKEN_BUDGET); send fewer or shorter texts")
        # Wait for the encoding in progress only while this one could still start and finish in time.
        rate = self._tokens_per_second
        start_by = None if deadline is None else deadline - (cost / rate if rate else 0.0)
        wait = -1 if start_by is None else max(0.0, start_by - time.monotonic())
        if not self._encoding.acquire(timeout=wait):
            raise Overloaded(f"Another request's {asked_by} are being encoded, and this request's could "
                             "not be encoded before its REQUEST_TIMEOUT; retry shortly")
        try:
            started = time.monotonic()
            features = ensemble_features(self.encoder, labels, templates, deadline)
            seconds = time.monotonic() - started
            if seconds > 0.05:  # shorter ones are mostly overhead
                self._tokens_per_second = cost / seconds if not rate else 0.7 * rate + 0.3 * cost / seconds
            return features
        finally:
            self._encoding.release()
