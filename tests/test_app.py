"""The app factory (http/app.py): routes, limits, JSON settings and the order of the request hooks."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

from werkzeug.middleware.proxy_fix import ProxyFix

import clip_service
from clip_service.http.app import MULTIPART_OVERHEAD, create_app
from clip_service.http.current import EXTENSION, current_service
from clip_service.service import ClipService
from tests.support.engines import EngineWrapper
from tests.support.images import image_bytes
from tests.support.responses import assert_error, assert_success

ROUTES = {"/analyze": {"GET", "POST"}, "/health": {"GET"}, "/labels": {"GET"}, "/metrics": {"GET"},
          "/": {"GET"}, "/static/page.css": {"GET"}, "/static/page.js": {"GET"}, "/openapi.json": {"GET"},
          "/v3/analyze": {"GET", "POST"}, "/v2/analyze": {"GET"}, "/v2/analyze_file": {"GET"},
          "/analyze/batch": {"POST"}, "/embed": {"GET", "POST"}, "/search": {"GET", "POST"},
          "/search/index": {"GET"}, "/search/thumbnail": {"GET"}}


def png() -> bytes:
    return image_bytes("PNG", (40, 30), "red")


def test_the_package_gives_the_factory(app):
    assert clip_service.create_app is create_app
    assert isinstance(app.extensions["clip_service"], ClipService)


def test_routes_are_exactly_the_api_and_the_page_files_no_general_static_route(app):
    routes: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        routes.setdefault(rule.rule, set()).update(rule.methods - {"HEAD", "OPTIONS"})
    assert routes == ROUTES


def test_a_given_engine_is_used_as_it_is(make_app, settings, tiny_engine):
    engine = EngineWrapper(tiny_engine)
    app = make_app(settings, engine=engine)
    with app.app_context():
        assert current_service() is app.extensions[EXTENSION]
    assert app.extensions[EXTENSION].classifier.engine is engine
    response = app.test_client().post("/analyze", data={"file": (io.BytesIO(png()), "x.png")})
    assert_success(response)
    assert engine.batches == [1]


def test_json_keeps_emoji_as_characters_and_keys_in_order(make_app, settings, tiny_engine):
    client = make_app(settings, engine=tiny_engine).test_client()
    response = client.get("/labels")
    assert "🐱".encode() in response.data and b"\\u" not in response.data
    assert list(response.get_json()) == ["service", "status", "version", "num_labels", "templates", "groups"]


def test_uploads_are_bounded_by_max_image_bytes(make_app, settings, tiny_engine):
    small = dataclasses.replace(settings, max_image_bytes=4096)
    app = make_app(small, engine=tiny_engine)
    assert app.config["MAX_CONTENT_LENGTH"] == 4096 + MULTIPART_OVERHEAD
    response = app.test_client().post(
        "/analyze", data={"file": (io.BytesIO(b"\0" * (4096 + MULTIPART_OVERHEAD)), "x.png")})
    assert_error(response, 413)


def test_a_bad_query_string_is_refused_before_the_key_is_checked(make_app, settings, tiny_engine):
    client = make_app(dataclasses.replace(settings, api_key="s3cret"), engine=tiny_engine).test_client()
    assert_error(client.get("/analyze?url=%ff"), 401)  # percent-encoded: a plain string
    response = client.get("/analyze", environ_overrides={"QUERY_STRING": b"url=\xff".decode("latin-1")})
    assert_error(response, 400, "not valid UTF-8")


def test_trusted_proxies_put_proxy_fix_in_front(make_app, settings, tiny_engine):
    assert not isinstance(make_app(settings, engine=tiny_engine).wsgi_app, ProxyFix)
    app = make_app(dataclasses.replace(settings, trusted_proxies=1), engine=tiny_engine)
    assert isinstance(app.wsgi_app, ProxyFix) and app.wsgi_app.x_for == 1


def test_create_app_returns_at_once_while_the_model_loads(settings):
    app = create_app(settings)
    service = app.extensions["clip_service"]
    try:
        assert app.test_client().get("/health").get_json()["model_status"] in ("loading", "loaded")
        assert service.wait_until_settled(60)
    finally:
        service.stop()


def test_answers_name_a_local_model_by_its_folder_not_the_servers_path(make_app, settings):
    app = make_app(settings)
    client = app.test_client()
    folder = settings.clip_model.removeprefix("local-dir:")
    expected = "local-dir:" + Path(folder).name
    health = client.get("/health").get_json()
    analyzed = assert_success(client.post("/analyze", data={"file": (io.BytesIO(png()), "x.png")}))
    metrics = client.get("/metrics").get_data(as_text=True)
    assert health["model"] == expected and analyzed["metadata"]["model_info"]["model"] == expected
    assert folder not in json.dumps(health) + json.dumps(analyzed) + metrics
