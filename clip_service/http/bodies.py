"""The JSON bodies of the API, built in one place from the service's state (openapi.py describes them)."""

from __future__ import annotations

from dataclasses import asdict

from clip_service.engines.spec import public_model_name
from clip_service.runtime.host import LOADED
from clip_service.service import ClipService
from clip_service.tasks.classify import Classifier, Prediction


def prediction_body(prediction: Prediction) -> dict:
    body = asdict(prediction)
    if body["emoji"] is None:
        del body["emoji"]
    return body


def model_info_body(classifier: Classifier) -> dict:
    """`metadata.model_info`: "framework" is whose weights these are (OpenAI or OpenCLIP)."""
    engine = classifier.engine
    return {"framework": engine.weights_source, "model": public_model_name(engine.name),
            "device": engine.device_name, "labels_version": classifier.vocabulary.version}


def analyze_body(predictions: list[Prediction], classifier: Classifier, processing_time: float) -> dict:
    return {
        "service": "clip",
        "status": "success",
        "predictions": [prediction_body(prediction) for prediction in predictions],
        "metadata": {"processing_time": processing_time, "model_info": model_info_body(classifier)},
    }


def error_body(message: str, processing_time: float) -> dict:
    return {"service": "clip", "status": "error", "predictions": [], "error": {"message": message},
            "metadata": {"processing_time": processing_time}}


def health_body(service: ClipService) -> dict:
    """/health: healthy only when the model loaded and inference works."""
    host = service.host
    if host.status == LOADED:
        engine = host.classifier.engine
        body = {"status": "healthy", "model_status": LOADED, "device": engine.device_name,
                "num_labels": len(host.classifier.label_set), "model": public_model_name(engine.name)}
        if service.health.inference_error:
            body.update(status="unhealthy", error=f"Inference is failing: {service.health.inference_error}")
        return body
    body = {"status": "unhealthy", "model_status": host.status, "device": None, "num_labels": 0}
    if host.error:
        body["error"] = host.error
    return body


def labels_body(service: ClipService) -> dict:
    """/labels: the loaded vocabulary grouped by file, each label with its emoji."""
    vocabulary = service.ready_classifier().vocabulary
    emoji_for = service.emoji.emoji_for
    groups = {
        group: [{"label": label, **({"emoji": e} if (e := emoji_for(label)) else {})} for label in labels]
        for group, labels in vocabulary.label_set.groups.items()
    }
    return {"service": "clip", "status": "success", "version": vocabulary.version,
            "num_labels": len(vocabulary.label_set), "templates": list(vocabulary.templates),
            "groups": groups}
