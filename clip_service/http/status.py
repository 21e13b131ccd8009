"""What the service says about itself: /health (for probes), /labels and /metrics."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from clip_service import metrics
from clip_service.http.bodies import health_body, labels_body
from clip_service.http.current import current_service

status_bp = Blueprint("status", __name__)


@status_bp.get("/health")
def health():
    body = health_body(current_service())
    return jsonify(body), 200 if body["status"] == "healthy" else 503


@status_bp.get("/labels")
def labels():
    return jsonify(labels_body(current_service()))


@status_bp.get("/metrics")
def prometheus_metrics():
    body, content_type = metrics.exposition()
    return Response(body, content_type=content_type)
