"""http/status.py: /health's status code follows the body (probes read only the code), /labels waits
for the model, /metrics is Prometheus text."""

from __future__ import annotations

import dataclasses

from tests.support.engines import GatedEngine
from tests.support.responses import assert_error


def test_health_is_503_until_loaded_then_200_and_503_again_while_inference_fails(make_app, settings,
                                                                                 tiny_engine):
    engine = GatedEngine(tiny_engine)
    app = make_app(dataclasses.replace(settings, health_canary_seconds=0), engine=engine, wait=False)
    client, service = app.test_client(), app.extensions["clip_service"]
    loading = client.get("/health")
    assert loading.status_code == 503 and loading.get_json()["status"] == "unhealthy"
    engine.gate.set()
    assert service.wait_until_settled(30)
    assert client.get("/health").status_code == 200
    service.health.inference_failed(RuntimeError("device lost"))
    failing = client.get("/health")
    assert failing.status_code == 503 and failing.get_json()["model_status"] == "loaded"


def test_labels_answer_once_the_model_is_loaded(make_app, settings, tiny_engine):
    engine = GatedEngine(tiny_engine)
    app = make_app(settings, engine=engine, wait=False)
    client = app.test_client()
    response = client.get("/labels")
    assert_error(response, 503, "loading")
    assert response.headers["Retry-After"]
    engine.gate.set()
    assert app.extensions["clip_service"].wait_until_settled(30)
    answer = client.get("/labels")
    assert answer.status_code == 200 and answer.get_json()["num_labels"] == 10


def test_metrics_are_prometheus_text(client):
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.mimetype == "text/plain" and "version=" in response.headers["Content-Type"]
    text = response.get_data(as_text=True)
    assert "# TYPE clip_requests_total counter" in text and "# TYPE clip_healthy gauge" in text
