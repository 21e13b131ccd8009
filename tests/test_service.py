"""service.py: one worker's service wires its rooms from the settings; this checks the wiring, the parts
have their own tests (runtime, inputs, vocabulary, tasks)."""

from __future__ import annotations

import dataclasses
import time

import pytest
from PIL import Image

from clip_service.errors import NotReady, ShuttingDown
from clip_service.service import ClipService
from clip_service.tasks.classify import ClassifyOptions
from tests.support.engines import EngineWrapper, GatedEngine
from tests.support.images import encode


@pytest.fixture
def gated(tiny_engine):
    return GatedEngine(tiny_engine)


@pytest.fixture
def service(settings, gated):
    """A started service on a gated engine: loading waits until the test opens the gate."""
    started = ClipService(dataclasses.replace(settings, max_queue=3, request_timeout=7.0,
                                              confidence_threshold=0.05, max_predictions=4), gated)
    started.start()
    yield started
    gated.gate.set()  # a load still waiting ends now, not 30 s into later tests
    started.stop()


def test_before_the_model_loads_nothing_is_classified_and_images_decode_in_full(service):
    assert service.classifier is None and service.batcher is None and service.known_groups() == ()
    with pytest.raises(NotReady, match="loading"):
        service.ready_classifier()
    assert service.images.draft_size() is None
    assert (service.admission.max_queue, service.admission.request_timeout) == (3, 7.0)


def test_once_loaded_the_settings_defaults_apply_and_images_decode_at_the_model_size(service, gated):
    gated.gate.set()
    assert service.wait_until_settled(30)
    assert service.known_groups() == ("animals", "foods", "people")
    assert service.default_options() == ClassifyOptions(0.05, 4)
    assert service.images.draft_size() == (64, 64)
    [predictions] = service.classify([encode(Image.new("RGB", (80, 60), "red"), "PNG")],
                                     time.monotonic() + 10)
    assert 1 <= len(predictions) <= 4 and all(p.confidence >= 0.05 for p in predictions)
    assert service.batcher.batch_sizes, "analysis goes through the host's micro-batcher"
    [only_foods] = service.classify([encode(Image.new("RGB", (80, 60), "red"), "PNG")],
                                    time.monotonic() + 10, ClassifyOptions(0.0, 10, groups=("foods",)))
    assert {p.label for p in only_foods} == {"banana", "coffee", "pizza"}


def test_the_batcher_sees_the_admission_count(settings, tiny_engine):
    service = ClipService(dataclasses.replace(settings, health_canary_seconds=0), EngineWrapper(tiny_engine))
    service.start()
    try:
        assert service.wait_until_settled(30)
        with service.admission.admitted() as deadline:
            assert service.in_flight == 1 and deadline > time.monotonic()
            assert service.host.arriving() == 1
        assert service.in_flight == 0
    finally:
        service.stop()
    with pytest.raises(ShuttingDown):
        service.classify([encode(Image.new("RGB", (64, 64)), "PNG")], time.monotonic() + 10)
