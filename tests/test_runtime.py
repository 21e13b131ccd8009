"""The runtime rooms on their own: admission, health and the canary, and the model host's life cycle."""

from __future__ import annotations

import dataclasses
import math
import time

import pytest
import torch
from PIL import Image
from prometheus_client import REGISTRY

from clip_service.errors import BadInput, DeadlineExceeded, NotReady, Overloaded, ShuttingDown
from clip_service.runtime.admission import Admission
from clip_service.runtime.health import Canary, Health
from clip_service.runtime.host import FAILED, LOADED, ModelHost
from clip_service.vocabulary.emoji import emoji_mapper


def healthy_gauge() -> float:
    return REGISTRY.get_sample_value("clip_healthy")


# --- admission ---------------------------------------------------------------------------------------


def test_admission_counts_refuses_when_full_and_gives_deadlines():
    admission = Admission(max_queue=2, request_timeout=30.0)
    with admission.admitted() as first, admission.admitted():
        assert admission.in_flight == 2
        assert first == pytest.approx(time.monotonic() + 30.0, abs=1.0)
        with pytest.raises(Overloaded, match="2 requests in progress, MAX_QUEUE=2") as caught, \
                admission.admitted():
            pass
        assert caught.value.status == 503 and caught.value.retry_after == 1
    assert admission.in_flight == 0


def test_a_failing_request_gives_its_place_back():
    admission = Admission(max_queue=1, request_timeout=1.0)
    with pytest.raises(BadInput), admission.admitted():
        raise BadInput("no image")
    assert admission.in_flight == 0
    with admission.admitted():
        assert admission.in_flight == 1


def test_the_deadline_counts_from_arrival_not_admission():
    """Time spent waiting for a thread counts: a request that arrived too long ago gets 504 at once."""
    admission = Admission(max_queue=2, request_timeout=3.0)
    with pytest.raises(DeadlineExceeded, match="REQUEST_TIMEOUT=3 s") as caught, \
            admission.admitted(arrived=time.monotonic() - 3.0 - 1):
        pass
    assert caught.value.status == 504 and admission.in_flight == 0
    arrived = time.monotonic() - 2.0
    with admission.admitted(arrived=arrived) as deadline:
        assert deadline == pytest.approx(arrived + 3.0, abs=1e-9)


# --- health ------------------------------------------------------------------------------------------


def test_health_records_a_failure_once_and_the_recovery():
    health = Health()
    health.model_settled(True)
    assert healthy_gauge() == 1
    health.inference_failed(RuntimeError("CUDA error"))
    health.inference_failed(RuntimeError("CUDA error again"))
    assert health.inference_error == "RuntimeError: CUDA error again" and healthy_gauge() == 0
    health.inference_worked()
    assert health.inference_error is None and healthy_gauge() == 1


def test_watching_turns_a_broken_model_into_503_but_not_a_request_error():
    health = Health()
    with pytest.raises(NotReady, match="checking its device") as caught, health.watching():
        raise RuntimeError("device-side assert triggered")
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert health.inference_error.startswith("RuntimeError")
    with pytest.raises(DeadlineExceeded), health.watching():
        raise DeadlineExceeded("too slow")
    assert health.inference_error.startswith("RuntimeError"), "a request error says nothing of the model"
    with health.watching():
        pass
    assert health.inference_error is None


@pytest.mark.parametrize("value, healthy", [(0.5, True), (math.nan, False), (math.inf, False)])
def test_canary_needs_finite_features(value, healthy):
    health = Health()
    seen = []

    def image_features(image: Image.Image, deadline: float) -> torch.Tensor:
        seen.append((image.size, deadline - time.monotonic()))
        return torch.full((4,), value)

    canary = Canary(image_features, (64, 48), interval=30.0, timeout=5.0, health=health)
    assert canary.check() is healthy
    assert (health.inference_error is None) is healthy
    assert seen[0][0] == (48, 64) and 4.0 < seen[0][1] <= 5.0  # (W, H) probe, deadline 5 s away


# --- the host ----------------------------------------------------------------------------------------


def make_host(settings, engine=None) -> ModelHost:
    settings = dataclasses.replace(settings, health_canary_seconds=0)
    return ModelHost(settings, emoji_mapper(settings), Health(), engine=engine)


def test_host_loads_in_the_background_then_serves(settings, tiny_engine):
    host = make_host(settings, tiny_engine)
    with pytest.raises(NotReady, match="still loading"):
        host.ready()
    host.start()
    try:
        assert host.wait_until_settled(60)
        assert host.status == LOADED and host.error is None
        classifier = host.ready()
        assert classifier.engine is tiny_engine and len(classifier.label_set) == 10
        image = Image.new("RGB", (80, 60), "red")
        assert classifier.classify(image, 0.0, 3, time.monotonic() + 10)
        assert host.batcher.batch_sizes, "requests go through the micro-batcher"
        assert host.reload_labels()
    finally:
        host.stop()
    with pytest.raises(ShuttingDown):
        classifier.classify(image, 0.0, 3, time.monotonic() + 10)


def test_host_reports_a_failed_load(settings, tiny_engine, tmp_path):
    host = make_host(dataclasses.replace(settings, labels_dir=tmp_path), tiny_engine)
    host.start()
    assert host.wait_until_settled(60)
    assert host.status == FAILED and "No labels loaded" in host.error
    with pytest.raises(NotReady, match="failed to load: LabelsError"):
        host.ready()
    assert not host.reload_labels()
    host.stop()


def test_a_host_stopped_while_loading_runs_nothing_afterwards(settings, tiny_engine):
    host = make_host(dataclasses.replace(settings, labels_watch=True), tiny_engine)
    host.stop()
    host.start()
    assert host.wait_until_settled(60) and host.status == LOADED
    with pytest.raises(ShuttingDown):
        host.ready().classify(Image.new("RGB", (64, 64)), 0.0, 3, time.monotonic() + 10)
