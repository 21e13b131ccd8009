"""Embeddings: the unit vectors CLIP gives images and texts, as /embed and the photo index hand them out.

Image embeddings are the features /analyze scores (through the micro-batcher in the server). A text
embedded with `prompts` is exactly the feature /analyze scores that label with: the vocabulary's own row
when the text is a vocabulary label's text, else the prompt-ensemble feature that `labels=` uses (from
the same LRU cache). Without `prompts` a text is encoded as it is, cached in a second LRU.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence

import numpy as np
import torch

from clip_service.tasks.encode import Encoder
from clip_service.vocabulary.features import Vocabulary

AS_WRITTEN = ("{}",)  # a "template" that leaves a text as it is
ENCODINGS = ("float", "base64")  # how /embed writes vectors: numbers, or base64 of little-endian float32


class Embedder:
    """Embeds model inputs and texts with an encoder and the vocabulary in use (a reload swaps it)."""

    def __init__(self, encoder: Encoder, vocabulary: Callable[[], Vocabulary]):
        self.encoder = encoder
        self.vocabulary = vocabulary

    @property
    def dimensions(self) -> int:
        return int(self.vocabulary().features.shape[1])

    def images(self, inputs: list[torch.Tensor], deadline: float | None = None) -> torch.Tensor:
        """(N, D) unit float32 embeddings of model inputs from `encoder.prepare`, in one forward pass."""
        return self.encoder.images(inputs, deadline)

    def texts(self, texts: Sequence[str], prompts: bool = False, deadline: float | None = None,
              ) -> torch.Tensor:
        """(N, D) unit float32 embeddings, in input order (repeats included).

        New texts are encoded under the same token budget, one request at a time, as `labels=`.
        """
        distinct = tuple(dict.fromkeys(texts))
        if not prompts:
            vectors = self.encoder.plain_texts.features(distinct, AS_WRITTEN, deadline, asked_by="texts")
            found = dict(zip(distinct, vectors, strict=True))
            return torch.stack([found[text] for text in texts])
        vocabulary = self.vocabulary()  # read once: a reload may swap it meanwhile
        rows = vocabulary.text_rows
        others = tuple(text for text in distinct if text not in rows)
        found = dict(zip(others, self.encoder.label_texts.features(
            others, vocabulary.templates, deadline, asked_by="texts"), strict=True)) if others else {}
        return torch.stack([vocabulary.features[rows[text]] if text in rows else found[text]
                            for text in texts])


def float_lists(embeddings: torch.Tensor) -> list[list[float]]:
    """(N, D) float32 -> lists of the shortest decimals that read back as the same float32 values."""
    return [[float(value) for value in row] for row in embeddings.numpy().astype(np.float32).astype(str)]


def base64_rows(embeddings: torch.Tensor) -> list[str]:
    """(N, D) float32 -> one base64 string per row: D little-endian float32 values."""
    rows = embeddings.numpy().astype("<f4")
    return [base64.b64encode(row.tobytes()).decode("ascii") for row in rows]
