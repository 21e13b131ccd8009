"""Metrics and request logs."""

import dataclasses
import json
import logging

from prometheus_client.parser import text_string_to_metric_families

from clip_service.http.logs import JsonLinesFormatter
from tests.support.images import image_bytes
from tests.support.responses import assert_success, upload


def samples(client) -> dict:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain")
    found = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found, name, **labels):
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_requests_by_route_input_and_status(client, tmp_path):
    before = samples(client)
    assert_success(upload(client, image_bytes()))
    client.get("/analyze", query_string={"file": str(tmp_path / "absent.jpg")})
    after = samples(client)
    for labels, expected in (({"route": "/analyze", "input": "upload", "status": "200"}, 1),
                             ({"route": "/analyze", "input": "file", "status": "404"}, 1)):
        assert value(after, "clip_requests_total", **labels) - value(
            before, "clip_requests_total", **labels) == expected
    for stage in ("decode", "model", "total"):
        assert value(after, "clip_stage_seconds_count", stage=stage) > value(
            before, "clip_stage_seconds_count", stage=stage)
    assert value(after, "clip_batch_size_count") > value(before, "clip_batch_size_count")
    assert value(after, "clip_labels") == 10
    assert value(after, "clip_healthy") == 1
    info = [key for key in after if key[0] == "clip_model_info" and after[key] == 1]
    assert any(dict(labels)["framework"] == "OpenCLIP" for _, labels in info)
    assert ("clip_requests_in_flight", ()) in after
    assert ("clip_emoji_api_up", ()) in after


def test_one_log_line_per_request_without_the_url(make_app, settings, caplog, local_server):
    client = make_app(dataclasses.replace(settings, url_allowlist=("127.0.0.1",))).test_client()
    secret_url = f"http://user:hunter2@127.0.0.1:{local_server.port}/x.png?token=abc"
    local_server.routes["/x.png?token=abc"] = (200, {}, image_bytes())
    with caplog.at_level(logging.INFO, logger="clip_service.requests"):
        client.get("/analyze", query_string={"url": secret_url})
    lines = [record for record in caplog.records if record.name == "clip_service.requests"]
    assert len(lines) == 1
    record = lines[0]
    assert record.fields["input"] == "url" and record.fields["status"] == 200
    assert record.fields["method"] == "GET" and record.fields["route"] == "/analyze"
    assert record.fields["client"] == "127.0.0.1" and record.fields["duration_ms"] > 0
    text = record.getMessage() + json.dumps(record.fields)
    assert "hunter2" not in text and "token" not in text and "x.png" not in text


def test_json_lines_format():
    record = logging.LogRecord("clip_service.requests", logging.INFO, __file__, 1, "GET /health %s",
                               ("ok",), None)
    record.fields = {"route": "/health", "status": 200}
    entry = json.loads(JsonLinesFormatter().format(record))
    assert entry["message"] == "GET /health ok" and entry["status"] == 200
    assert entry["level"] == "INFO" and entry["logger"] == "clip_service.requests"


def test_emoji_api_reachability_metric(make_app, settings, local_server):
    local_server.routes["/emoji_mappings.json"] = (200, {}, b'{"cat": "x"}')
    app = make_app(dataclasses.replace(settings, api_port=local_server.port))
    found = samples(app.test_client())
    assert value(found, "clip_emoji_api_up") == 1


def test_client_address_behind_a_trusted_proxy(make_app, settings, caplog):
    trusting = make_app(dataclasses.replace(settings, trusted_proxies=1)).test_client()
    plain = make_app(settings).test_client()
    headers = {"X-Forwarded-For": "203.0.113.7"}
    with caplog.at_level(logging.INFO, logger="clip_service.requests"):
        trusting.get("/health", headers=headers)
        plain.get("/health", headers=headers)
    clients = [record.fields["client"] for record in caplog.records if record.name == "clip_service.requests"]
    assert clients == ["203.0.113.7", "127.0.0.1"]
