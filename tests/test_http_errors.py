"""http/errors.py: every failure as the error JSON, with the headers that go with it, and a check that
runs before any route."""

from __future__ import annotations

import dataclasses
import logging

from clip_service.errors import NotReady, Overloaded
from tests.support.images import image_bytes
from tests.support.responses import assert_error, upload


def _raise_in_analyze(monkeypatch, error: Exception) -> None:
    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr("clip_service.http.analyze.parse_options", failing)


def test_a_503_says_when_to_retry(client, monkeypatch):
    _raise_in_analyze(monkeypatch, Overloaded("busy", retry_after=3))
    assert upload(client, image_bytes()).headers["Retry-After"] == "3"
    _raise_in_analyze(monkeypatch, NotReady("loading"))
    assert upload(client, image_bytes()).headers["Retry-After"] == "5"


def test_an_error_keeps_its_own_headers(make_app, settings):
    keyed = make_app(dataclasses.replace(settings, api_key="s3cret")).test_client()
    response = keyed.get("/labels")
    assert_error(response, 401)
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="clip-service"'


def test_werkzeug_errors_keep_their_headers_but_not_their_html(client):
    response = client.delete("/analyze")
    assert_error(response, 405)
    assert set(response.headers["Allow"].replace(" ", "").split(",")) >= {"GET", "POST"}
    assert response.mimetype == "application/json"


def test_an_unexpected_error_is_logged_with_its_traceback_and_answered_without(client, monkeypatch, caplog):
    _raise_in_analyze(monkeypatch, KeyError("secret internal detail"))
    with caplog.at_level(logging.ERROR, logger="clip_service.http.errors"):
        message = assert_error(upload(client, image_bytes()), 500, "the service log has the details")
    assert "secret" not in message
    (record,) = [record for record in caplog.records if record.name == "clip_service.http.errors"]
    assert "POST /analyze" in record.getMessage() and "secret internal detail" in caplog.text
    assert record.exc_info is not None


def test_a_query_string_that_is_not_utf8_is_refused_on_every_route(client):
    for path in ("/health", "/labels", "/analyze", "/nowhere"):
        response = client.get(path, environ_overrides={"QUERY_STRING": b"x=caf\xe9".decode("latin-1")})
        assert_error(response, 400, "not valid UTF-8", "percent-encode")
