"""The per-request label cache (vocabulary/custom_labels.py): LRU, and emptied when the templates change."""

from __future__ import annotations

import torch

from clip_service.vocabulary.custom_labels import CustomLabelCache


class CountingEncoder:
    """Each text -> a distinct unit vector; records every text it is asked to encode."""

    identity = "counting"

    def __init__(self):
        self.texts: list[str] = []

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        self.texts.extend(texts)
        rows = [torch.tensor([float(sum(map(ord, text))), 1.0]) for text in texts]
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


def test_cached_labels_are_not_encoded_again():
    encoder = CountingEncoder()
    cache = CustomLabelCache(encoder, size=8)
    first = cache.features(("zebra", "giraffe"), ("a photo of a {}.",))
    again = cache.features(("giraffe", "zebra"), ("a photo of a {}.",))
    assert encoder.texts == ["a photo of a zebra.", "a photo of a giraffe."]
    assert torch.equal(first, again.flip(0))


def test_the_least_recently_used_label_goes_first():
    encoder = CountingEncoder()
    cache = CustomLabelCache(encoder, size=2)
    template = ("{}",)
    cache.features(("a",), template)
    cache.features(("b",), template)
    cache.features(("a",), template)  # a is now the most recent
    cache.features(("c",), template)  # evicts b
    encoder.texts.clear()
    cache.features(("a", "c"), template)
    assert encoder.texts == []
    cache.features(("b",), template)
    assert encoder.texts == ["b"]


def test_new_templates_empty_the_cache():
    encoder = CountingEncoder()
    cache = CustomLabelCache(encoder)
    cache.features(("zebra",), ("a photo of a {}.",))
    cache.features(("zebra",), ("art of the {}.",))
    assert encoder.texts == ["a photo of a zebra.", "art of the zebra."]
