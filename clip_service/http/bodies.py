"""The JSON bodies of the API, built in one place from the service's state (openapi.py describes them)."""

from __future__ import annotations

from dataclasses import asdict

import torch

from clip_service.engines.spec import public_model_name
from clip_service.errors import ServiceError, without_server_paths
from clip_service.library.photo_index import PhotoIndex
from clip_service.runtime.host import LOADED
from clip_service.service import ClipService
from clip_service.tasks.classify import Classifier, Prediction
from clip_service.tasks.embed import base64_rows, float_lists
from clip_service.tasks.search import Match


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


def batch_body(outcomes: list[list[Prediction] | ServiceError], classifier: Classifier,
               processing_time: float) -> dict:
    """/analyze/batch: one /analyze answer per image, in order; an error answer for a bad image."""
    return {
        "service": "clip",
        "status": "success",
        "results": [error_body(outcome.message, processing_time) if isinstance(outcome, ServiceError)
                    else analyze_body(outcome, classifier, processing_time) for outcome in outcomes],
        "metadata": {"processing_time": processing_time, "model_info": model_info_body(classifier)},
    }


def embed_body(vectors: torch.Tensor, encoding: str, classifier: Classifier, processing_time: float) -> dict:
    """/embed: one unit vector per input, in order: lists of numbers, or base64 little-endian float32."""
    model_info = {**model_info_body(classifier), "dimensions": int(classifier.features.shape[1])}
    return {
        "service": "clip",
        "status": "success",
        "embeddings": base64_rows(vectors) if encoding == "base64" else float_lists(vectors),
        "metadata": {"processing_time": processing_time, "model_info": model_info},
    }


def search_body(matches: list[Match], index: PhotoIndex, classifier: Classifier, processing_time: float,
                ) -> dict:
    """/search: the best matches first, paths relative to the indexed folder."""
    return {
        "service": "clip",
        "status": "success",
        "matches": [{"path": match.path, "score": match.score} for match in matches],
        "metadata": {"processing_time": processing_time, "index_size": len(index.paths),
                     "model_info": model_info_body(classifier)},
    }


def index_body(index: PhotoIndex) -> dict:
    """/search/index: what the photo index holds (never where it is on the server)."""
    return {"service": "clip", "status": "success",
            "index": {"images": len(index.paths), "dimensions": index.dimensions,
                      "model": public_model_name(index.model)}}


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
        body["error"] = without_server_paths(host.error)
    return body


# An absolute path (not part of a URL), or a local-dir: model's; group 1 is its last part
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
