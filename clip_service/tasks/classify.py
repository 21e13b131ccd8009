"""Zero-shot classification: an image's features against candidate labels, scored into Predictions.

CLIP's rule is cosine similarity times the logit scale, softmax over the candidates (sigmoid per label
for SigLIP-style models). The candidates are the vocabulary, some of its groups, or a request's own
labels. How an image becomes features (one at a time, or through the micro-batcher) is the Encoder's
(tasks/encode.py), given to the Classifier, not chosen by it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from PIL import Image

from clip_service.cores import map_on_cores
from clip_service.engines.base import Engine
from clip_service.tasks.encode import Encoder
from clip_service.vocabulary.features import Vocabulary
from clip_service.vocabulary.labels import LabelSet


@dataclass(frozen=True)
class Prediction:
    """One label for one image, as /analyze and the tagger report it."""

    label: str
    confidence: float
    emoji: str | None = None


def label_probabilities(image_features: torch.Tensor, label_features: torch.Tensor,
                        logit_scale: float, logit_bias: float | None = None) -> torch.Tensor:
    """(N, D) image and (L, D) label features, both unit length -> (N, L) probabilities.

    CLIP models were trained with a softmax over labels; SigLIP models (which carry a logit bias)
    with an independent sigmoid per label, so each of their confidences is that label's own
    probability and does not shrink as the vocabulary grows.
    """
    logits = logit_scale * image_features @ label_features.T
    if logit_bias is not None:
        return torch.sigmoid(logits + logit_bias)
    return logits.softmax(dim=-1)


def top_predictions(probabilities: torch.Tensor, labels: Sequence[str], threshold: float,
                    limit: int, emoji_for: Callable[[str], str | None] = lambda _: None,
                    ) -> list[Prediction]:
    """(L,) probabilities of one image -> at most `limit` predictions at or above `threshold`.

    The threshold applies to the rounded confidence, so a reported 0.010 always passes 0.01.
    """
    count = min(limit, probabilities.numel())
    values, indices = probabilities.topk(count)
    predictions = []
    for value, index in zip(values.tolist(), indices.tolist(), strict=True):
        confidence = round(value, 3)
        if confidence < threshold:
            break
        label = labels[index]
        predictions.append(Prediction(label, confidence, emoji_for(label)))
    return predictions


class EmojiSource(Protocol):
    def emoji_for(self, label: str) -> str | None: ...


@dataclass(frozen=True)
class ClassifyOptions:
    """What one classification asks for: /analyze's per-request options, or the settings' defaults."""

    threshold: float
    limit: int
    labels: tuple[str, ...] | None = None  # the request's own label set, instead of the vocabulary
    groups: tuple[str, ...] | None = None  # only the labels of these files


@dataclass(frozen=True)
class Candidates:
    """The labels an image is scored against, and their (L, D) features."""

    labels: tuple[str, ...]
    features: torch.Tensor


class Classifier:
    """An encoder with its vocabulary: everything a classification needs.

    The vocabulary is swapped whole by a label reload while requests run; each call reads it once.
    """

    def __init__(self, encoder: Encoder | Engine, vocabulary: Vocabulary, emoji: EmojiSource):
        # an engine alone (the command-line tools, tests): encoded directly, with caches of its own
        self.encoder = encoder if isinstance(encoder, Encoder) else Encoder(encoder)
        self.vocabulary = vocabulary
        self.emoji = emoji

    @property
    def engine(self) -> Engine:
        return self.encoder.engine

    @property
    def label_set(self) -> LabelSet:
        return self.vocabulary.label_set

    @property
    def features(self) -> torch.Tensor:
        return self.vocabulary.features

    def image_features(self, image: Image.Image, deadline: float | None = None) -> torch.Tensor:
        """(D,) unit feature of one image; `deadline` is a time.monotonic() value."""
        return self.many_image_features([image], deadline)[0]

    def many_image_features(self, images: list[Image.Image], deadline: float | None = None,
                            ) -> torch.Tensor:
        """(N, D) unit features of several images, in one forward pass (resized in parallel)."""
        return self.encoder.images(map_on_cores(self.encoder.prepare, images), deadline)

    def candidates(self, labels: tuple[str, ...] | None = None, groups: tuple[str, ...] | None = None,
                   deadline: float | None = None) -> Candidates:
        """A request's own labels, the labels of some groups, or (neither given) the whole vocabulary."""
        vocabulary = self.vocabulary
        if labels is not None:
            features = self.encoder.label_texts.features(labels, vocabulary.templates, deadline)
            return Candidates(labels, features)
        if groups is not None:
            group_rows = vocabulary.group_rows
            rows = list(dict.fromkeys(row for group in groups for row in group_rows.get(group, ())))
            return Candidates(tuple(vocabulary.label_set.labels[row] for row in rows),
                              vocabulary.features[rows])
        return Candidates(vocabulary.label_set.labels, vocabulary.features)

    def classify(self, image: Image.Image, threshold: float, limit: int, deadline: float | None = None,
                 labels: tuple[str, ...] | None = None, groups: tuple[str, ...] | None = None,
                 ) -> list[Prediction]:
        candidates = self.candidates(labels, groups, deadline)
        if not candidates.labels:
            return []
        image_features = self.image_features(image, deadline).unsqueeze(0)  # (1, D)
        return self.predictions(image_features, candidates, threshold, limit)[0]

    def classify_prepared(self, inputs: list[torch.Tensor], threshold: float, limit: int,
                          deadline: float | None = None, labels: tuple[str, ...] | None = None,
                          groups: tuple[str, ...] | None = None) -> list[list[Prediction]]:
        """Several model inputs from `engine.prepare` in one forward pass (/analyze/batch, the tagger)."""
        candidates = self.candidates(labels, groups, deadline)
        if not candidates.labels:
            return [[] for _ in inputs]
        return self.predictions(self.encoder.images(inputs, deadline), candidates, threshold, limit)

    def predictions(self, image_features: torch.Tensor, candidates: Candidates, threshold: float,
                    limit: int) -> list[list[Prediction]]:
        """(N, D) image features -> each image's predictions among the candidates."""
        probabilities = label_probabilities(image_features, candidates.features, self.engine.logit_scale,
                                            self.engine.logit_bias)
        return [top_predictions(row, candidates.labels, threshold, limit, self.emoji.emoji_for)
                for row in probabilities]
