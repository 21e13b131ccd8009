"""The per-request label cache (vocabulary/custom_labels.py): LRU, and emptied when the templates change."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from clip_service.errors import BadInput, DeadlineExceeded, Overloaded
from clip_service.vocabulary.custom_labels import CustomLabelCache, prompt_tokens


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


class GatedEncoder(CountingEncoder):
    """Holds every encoding until `release` is set, so a second request arrives while one encodes."""

    def __init__(self):
        super().__init__()
        self.started, self.release = threading.Event(), threading.Event()

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        self.started.set()
        assert self.release.wait(10)
        return super().encode_texts(texts)


def test_new_labels_over_the_token_budget_are_a_400_that_names_the_limit(tiny_engine):
    cache = CustomLabelCache(tiny_engine, token_budget=200)
    templates = ("a photo of a {}.", "a drawing of a {}.")
    labels = tuple(f"label number {index}" for index in range(8))
    cost = prompt_tokens(tiny_engine, [t.format(label) for t in templates for label in labels])
    assert cost == 16 * 10  # start, "a photo of a" (4), "label number N" (3), ".", end
    with pytest.raises(BadInput, match=r"160 tokens, over the limit of 100 .*LABELS_TOKEN_BUDGET"):
        CustomLabelCache(tiny_engine, token_budget=100).features(labels, templates)
    assert cache.features(labels, templates).shape[0] == 8  # within 200: encoded
    assert CustomLabelCache(tiny_engine, token_budget=160).features(labels, templates).shape[0] == 8
    cache.token_budget = 0
    assert cache.features(labels, templates).shape[0] == 8  # cached labels cost nothing


def test_one_request_encodes_at_a_time_and_others_wait_within_their_deadlines():
    encoder = GatedEncoder()
    cache = CustomLabelCache(encoder)
    template = ("{}",)
    encoder.release.set()
    cache.features(("cached",), template)
    encoder.release.clear()
    first = threading.Thread(target=cache.features, args=(("slow",), template))
    first.start()
    assert encoder.started.wait(10)
    began = time.monotonic()
    with pytest.raises(Overloaded, match="being encoded.*REQUEST_TIMEOUT"):
        cache.features(("other",), template, deadline=time.monotonic() + 0.4)
    assert 0.35 <= time.monotonic() - began < 1, "it waited for its turn until its deadline, no longer"
    began = time.monotonic()
    assert cache.features(("cached",), template).shape == (1, 2), "cached labels need no encoding"
    assert time.monotonic() - began < 0.5
    waiting = []
    second = threading.Thread(target=lambda: waiting.append(cache.features(("other",), template,
                                                                           time.monotonic() + 30)))
    second.start()
    time.sleep(0.2)
    assert waiting == [], "it waits for the encoding in progress"
    encoder.release.set()
    first.join(10)
    second.join(10)
    assert waiting[0].shape == (1, 2), "then encodes its own labels"


def test_the_same_new_labels_asked_at_once_are_encoded_once_for_all():
    """A client's thread pool sends one label set from 8 threads: each waits for the one encoding."""
    encoder = GatedEncoder()
    cache = CustomLabelCache(encoder)
    templates = ("{}", "a {}")
    labels = ("red", "green", "blue")
    answers, errors = [], []

    def ask(order):
        try:
            answers.append(dict(zip(order, cache.features(order, templates, time.monotonic() + 30),
                                    strict=True)))
        except Exception as error:  # noqa: BLE001  every failure is what the test reports
            errors.append(error)

    threads = [threading.Thread(target=ask, args=(labels if index % 2 else labels[::-1],))
               for index in range(8)]
    for thread in threads:
        thread.start()
    assert encoder.started.wait(10)
    time.sleep(0.3)  # all eight are asking now
    encoder.release.set()
    for thread in threads:
        thread.join(10)
    assert errors == [] and len(answers) == 8
    assert sorted(encoder.texts) == sorted(template.format(label) for template in templates
                                           for label in labels), "encoded once, not once a request"
    assert all(torch.equal(answer[label], answers[0][label]) for answer in answers for label in labels)


def test_a_waiter_whose_deadline_passes_gets_504_and_the_encoding_goes_on():
    encoder = GatedEncoder()
    cache = CustomLabelCache(encoder)
    first = threading.Thread(target=cache.features, args=(("slow",), ("{}",)))
    first.start()
    assert encoder.started.wait(10)
    began = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="another request was encoding the same labels="):
        cache.features(("slow",), ("{}",), deadline=time.monotonic() + 0.3)
    assert time.monotonic() - began < 1
    encoder.release.set()
    first.join(10)
    assert encoder.texts == ["slow"]


def test_no_template_is_encoded_after_the_deadline():
    encoder = CountingEncoder()
    with pytest.raises(DeadlineExceeded, match="REQUEST_TIMEOUT"):
        CustomLabelCache(encoder).features(("late",), ("{}", "a {}"), deadline=time.monotonic() - 0.1)
    assert encoder.texts == []


def test_the_deadline_is_checked_every_16_texts():
    """README: "the deadline is checked every 16 texts": 100 texts whose time runs out during the first
    pass are cut after it, never encoded in one pass of 100 (only a deadline already past was tested)."""
    batches = []

    class Slow(CountingEncoder):
        def encode_texts(self, texts):
            batches.append(len(texts))
            time.sleep(0.3)
            return super().encode_texts(texts)

    labels = tuple(f"colour {index}" for index in range(100))
    cache = CustomLabelCache(Slow(), token_budget=100_000)
    with pytest.raises(DeadlineExceeded):
        cache.features(labels, ("{}",), deadline=time.monotonic() + 0.1)
    assert batches == [16], batches
