"""http/bodies.py: the JSON bodies, built in one place from the service's state."""

from __future__ import annotations

import dataclasses

from clip_service.http.bodies import (
    analyze_body,
    error_body,
    health_body,
    labels_body,
    model_info_body,
    prediction_body,
)
from clip_service.tasks.classify import Prediction
from tests.support.engines import GatedEngine
from tests.support.vocabulary import EMOJI, LABELS


def test_a_prediction_without_emoji_has_no_emoji_key():
    assert prediction_body(Prediction("cat", 0.5, "🐱")) == {"label": "cat", "confidence": 0.5, "emoji": "🐱"}
    assert prediction_body(Prediction("astronaut", 0.25)) == {"label": "astronaut", "confidence": 0.25}


def test_model_info_and_analyze_body_name_the_model_by_its_folder(app, tiny_model_dir):
    classifier = app.extensions["clip_service"].classifier
    info = model_info_body(classifier)
    assert info == {"framework": "OpenCLIP", "model": f"local-dir:{tiny_model_dir.name}", "device": "cpu",
                    "labels_version": classifier.vocabulary.version}
    body = analyze_body([Prediction("cat", 0.75, "🐱"), Prediction("man", 0.25)], classifier, 0.012)
    assert body == {"service": "clip", "status": "success",
                    "predictions": [{"label": "cat", "confidence": 0.75, "emoji": "🐱"},
                                    {"label": "man", "confidence": 0.25}],
                    "metadata": {"processing_time": 0.012, "model_info": info}}


def test_error_body():
    assert error_body("Not an image", 0.003) == {
        "service": "clip", "status": "error", "predictions": [], "error": {"message": "Not an image"},
        "metadata": {"processing_time": 0.003}}


def test_health_body_while_loading_when_loaded_and_when_inference_fails(make_app, settings, tiny_engine,
                                                                       tiny_model_dir):
    engine = GatedEngine(tiny_engine)
    app = make_app(dataclasses.replace(settings, health_canary_seconds=0), engine=engine, wait=False)
    service = app.extensions["clip_service"]
    assert health_body(service) == {"status": "unhealthy", "model_status": "loading", "device": None,
                                    "num_labels": 0}
    engine.gate.set()
    assert service.wait_until_settled(30)
    healthy = {"status": "healthy", "model_status": "loaded", "device": "cpu", "num_labels": 10,
               "model": f"local-dir:{tiny_model_dir.name}"}
    assert health_body(service) == healthy
    service.health.inference_failed(RuntimeError("device lost"))
    assert health_body(service) == {**healthy, "status": "unhealthy",
                                    "error": f"Inference is failing: {service.health.inference_error}"}


def test_health_body_after_a_failed_load_says_why(make_app, settings, tmp_path):
    service = make_app(dataclasses.replace(settings, labels_dir=tmp_path)).extensions["clip_service"]
    body = health_body(service)
    assert (body["status"], body["model_status"], body["num_labels"]) == ("unhealthy", "failed", 0)
    assert "No labels loaded" in body["error"]


def test_labels_body_groups_each_label_with_its_emoji(app):
    body = labels_body(app.extensions["clip_service"])
    assert list(body) == ["service", "status", "version", "num_labels", "templates", "groups"]
    assert body["num_labels"] == 10 and len(body["templates"]) >= 1
    assert body["groups"] == {
        group: [{"label": label, **({"emoji": EMOJI[label]} if label in EMOJI else {})} for label in labels]
        for group, labels in LABELS.items()}
