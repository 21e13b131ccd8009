"""CLIP's zero-shot rule: cosine similarity times the logit scale, softmax over all labels."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Prediction:
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
