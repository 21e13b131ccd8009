"""Tokenised texts in batches cut to their own length: the text-encoding loop every engine shares.

CLIP's text tower is causal and pooled at the end-of-text token, so padding after that token changes
nothing but costs most of the time (labels are 5-10 tokens of a 77-token context). Texts are sorted by
length and each batch is cut to its longest text; an engine only runs its tower on each batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)


def end_of_text_lengths(tokens: torch.Tensor) -> torch.Tensor:
    """(N, context) CLIP tokens -> (N,) tokens up to and including end-of-text (the highest id)."""
    return tokens.argmax(dim=-1) + 1


def encode_in_length_batches(tokens: torch.Tensor, texts: list[str], cut: bool, batch_size: int,
                             encode: Callable[[torch.Tensor], torch.Tensor], skip: int = 0) -> torch.Tensor:
    """(N, context) tokens -> (N, D) unit float32 features, `encode` run once per batch.

    With `cut`, texts are sorted by token length and each batch is cut to its longest text (the tower
    must be causal and pooled at end-of-text); without, every batch keeps the full context.
    `encode`: (n, length) int64 tokens -> (n, D) features, unit or not. `skip`: leading positions
    that every text shares and `encode` already knows (text_prefix), left out of its batches.
    """
    lengths = end_of_text_lengths(tokens) if cut and tokens.ndim == 2 else None
    if lengths is not None and bool((lengths == tokens.shape[1]).any()):
        full = [text for text, length in zip(texts, lengths.tolist(), strict=True)
                if length == tokens.shape[1]]
        log.warning("%d text(s) fill the model's %d-token context and may have been cut, e.g. %r",
                    len(full), tokens.shape[1], full[0][:80])
    order = torch.argsort(lengths) if lengths is not None else torch.arange(len(texts))
    features: list[torch.Tensor | None] = [None] * len(texts)
    for start in range(0, len(texts), batch_size):
        index = order[start:start + batch_size]
        batch = tokens[index]
        if lengths is not None:
            batch = batch[:, skip:int(lengths[index].max())]
        encoded = torch.nn.functional.normalize(encode(batch).float(), dim=-1).cpu()
        for position, row in zip(index.tolist(), encoded, strict=True):
            features[position] = row
    return torch.stack(features)
