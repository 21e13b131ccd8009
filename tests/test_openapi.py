"""GET /openapi.json: a valid OpenAPI 3 description naming exactly the app's routes, which the app keeps.

Schemathesis generates requests from the served description (valid and invalid ones, boundary values,
the documented examples) and checks each answer against it: no 5xx, only documented statuses, content
types, headers and body shapes. The table at the end sends the requests fuzzing rarely reaches (a real
image, every error status) and checks those answers against the description the same way.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import re
import socket
from collections import Counter
from urllib.parse import quote

import hypothesis
import jsonschema_rs
import pytest
import requests
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.generation.feedback import FeedbackSources
from schemathesis.pytest._test_builder import build_operation_test
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.definitions import OPENAPI_30_VALIDATOR

from clip_service.http.access import OPEN_PATHS
from clip_service.http.openapi import openapi_description
from tests.support.engines import DeviceFaultEngine, GatedEngine, SlowEngine
from tests.support.images import image_bytes

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]
AUTOMATIC_METHODS = {"HEAD", "OPTIONS"}  # Flask adds these to every rule


def served(client) -> dict:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    return response.get_json()


# --- (a) a valid OpenAPI 3 document --------------------------------------------------------------------


def _refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_description_is_valid_openapi_3(client):
    description = served(client)
    assert description["openapi"].startswith("3.0.")
    OPENAPI_30_VALIDATOR.validate(description)
    for ref in set(_refs(description)):  # the meta-schema does not check that references resolve
        assert ref.startswith("#/"), ref
        target = description
        for part in ref[2:].split("/"):
            assert part in target, f"{ref} does not resolve"
            target = target[part]


def test_validator_is_not_a_no_op(client):
    broken = copy.deepcopy(served(client))
    broken["paths"]["/health"]["get"]["responses"]["200"] = {"content": {}}  # no description
    with pytest.raises(jsonschema_rs.ValidationError):
        OPENAPI_30_VALIDATOR.validate(broken)


def test_description_states_the_configured_limits(make_app, settings):
    configured = dataclasses.replace(settings, max_predictions=3, confidence_threshold=0.2)
    client = make_app(configured).test_client()
    description = served(client)
    limit = next(p for p in description["paths"]["/analyze"]["get"]["parameters"] if p["name"] == "limit")
    assert (limit["schema"]["maximum"], limit["schema"]["default"]) == (3, 3)
    form = description["paths"]["/analyze"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert form["schema"]["properties"]["threshold"]["default"] == 0.2
    assert description["components"]["schemas"]["AnalyzeSuccess"]["properties"]["predictions"][
        "maxItems"] == 3


# --- (b) exactly the app's routes and methods ----------------------------------------------------------


def test_paths_and_methods_are_exactly_the_routes(app):
    routes: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)  # Flask <int:id> -> OpenAPI {id}
        routes.setdefault(path, set()).update(rule.methods - AUTOMATIC_METHODS)
    paths = served(app.test_client())["paths"]
    described = {path: {method.upper() for method in item} for path, item in paths.items()}
    assert described == routes


def test_security_matches_the_open_paths(client):
    description = served(client)
    for path, item in description["paths"].items():
        for method, operation in item.items():
            is_open = operation.get("security", description["security"]) == []
            assert is_open == (path in OPEN_PATHS), f"{method.upper()} {path}"
            assert ("401" not in operation["responses"]) == is_open, f"{method.upper()} {path}"


def test_description_is_readable_without_the_key(make_app, settings):
    client = make_app(dataclasses.replace(settings, api_key="s3cret")).test_client()
    assert served(client)["paths"]
    assert client.get("/labels").status_code == 401


# --- (c) schemathesis against the live app --------------------------------------------------------------

# schemathesis.pytest.from_fixture(...).parametrize() reads request.node._nodeid, which pytest 9 no longer
# has; run_schemathesis builds, per operation, the test it would: the documented examples, the coverage
# cases (boundaries, missing, duplicated and wrong-typed values, other methods) and fuzzing, with valid and
# invalid data, as one Hypothesis test.
OPERATIONS = [(method.upper(), path)
              for path, item in openapi_description()["paths"].items() for method in item]
FUZZ_SETTINGS = hypothesis.settings(max_examples=30, derandomize=True, deadline=None, database=None,
                                    suppress_health_check=list(hypothesis.HealthCheck))


def schemathesis_config(*server_errors: int) -> schemathesis.Config:
    """not_a_server_error takes every 5xx as a failure except `server_errors` (documented answers)."""
    return schemathesis.Config.from_dict({"seed": 0, "checks": {"not_a_server_error": {
        "expected-statuses": ["2xx", "3xx", "4xx", *map(str, server_errors)]}}})


def run_schemathesis(app, method: str, path: str) -> Counter:
    """Every generated case of one operation through the app and CHECKS; the statuses answered.

    502 is the service's answer to the generated URLs (no name resolves, no address beyond loopback
    connects), so it is no server error here; 500, 503 and 504 are.
    """
    api = schemathesis.openapi.from_wsgi("/openapi.json", app, config=schemathesis_config(502))
    statuses = Counter()

    def check(case):
        statuses[case.call_and_validate(checks=CHECKS).status_code] += 1

    test = build_operation_test(config=api.config, operation=api[path][method], test_func=check,
                                given_kwargs={}, feedback=FeedbackSources(), explicit_settings=FUZZ_SETTINGS)
    test()
    return statuses


@pytest.fixture
def refused_beyond_loopback(network_fence, monkeypatch):
    """Generated URLs can name public addresses. The conftest fence stops such connections (and records
    them) by raising an AssertionError inside the service, which would show as a 500; here they end as a
    refused connection instead, as behind a firewall, and the service answers 502."""
    fenced_connect = socket.socket.connect

    def connect(self, address):
        try:
            return fenced_connect(self, address)
        except AssertionError as error:
            raise ConnectionRefusedError(str(error)) from None

    monkeypatch.setattr(socket.socket, "connect", connect)
    return network_fence


@pytest.mark.parametrize("method, path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_schemathesis_finds_nothing(app, refused_beyond_loopback, method, path):
    statuses = run_schemathesis(app, method, path)
    assert sum(statuses.values()) >= 10, statuses
    assert 500 not in statuses  # not_a_server_error raised already; this is for the reader


# --- every documented status, answered and checked the same way ---------------------------------------

def broken_model_dir(tmp_path):
    folder = tmp_path / "broken-model"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text('{"model_cfg": {"embed_dim": 8}}')
    (folder / "open_clip_model.safetensors").write_bytes(b"not weights")
    return folder


KEY = "s3cret-key"
LIMIT = 20_000  # MAX_IMAGE_BYTES of the "small" scenario
PNG = image_bytes("PNG", (64, 48))


def form(**fields):
    return {"body": fields, "media_type": "multipart/form-data"}


def get(**query):
    return {"query": query}


NOT_UTF8 = {"raw_query": b"x=caf\xe9"}  # Latin-1 bytes, not percent-encoded: 400 on every route


upload = form(file=PNG)


# scenario -> [(method, path, request, expected status)]; "{tmp}" in a query value is the allowed root.
SCENARIOS = {
    "ready": [
        ("POST", "/analyze", upload, 200),
        ("POST", "/analyze", form(file=PNG, labels="cat, dog,red fox"), 200),
        ("POST", "/analyze", {**upload, "query": {"groups": "animals", "limit": 2}}, 200),
        ("POST", "/analyze", {**form(file=PNG, threshold=0.5), "query": {"threshold": 0.5}}, 400),
        ("POST", "/analyze", form(file=b"not an image"), 400),
        ("GET", "/analyze", get(file="{tmp}/photo.png"), 200),
        ("GET", "/analyze", get(file="{tmp}/photo.png", threshold=0, limit=1, labels="a,b"), 200),
        ("GET", "/analyze", get(file="{tmp}/absent.png"), 404),
        ("GET", "/analyze", get(file="/etc/hostname"), 403),
        ("GET", "/analyze", get(url="http://127.0.0.1/x.png"), 403),
        ("GET", "/analyze", get(url="http://images.invalid/x.png"), 502),
        ("GET", "/analyze", get(groups="animals,unknown", file="{tmp}/photo.png"), 400),
        ("GET", "/labels", {}, 200),
        ("GET", "/health", {}, 200),
        ("GET", "/metrics", {}, 200),
        ("GET", "/", {}, 200),
        ("GET", "/static/page.css", {}, 200),
        ("GET", "/static/page.js", {}, 200),
        ("GET", "/openapi.json", {}, 200),
        *[(method, path, NOT_UTF8, 400) for method, path in OPERATIONS],
    ],
    "small": [  # MAX_IMAGE_BYTES=LIMIT
        ("POST", "/analyze", form(file=b"x" * (LIMIT + 1)), 413),
        ("POST", "/analyze", form(file=b"x" * (LIMIT + 70_000)), 413),  # over MAX_CONTENT_LENGTH, unread
        ("GET", "/analyze", get(file="{tmp}/big.png"), 413),
    ],
    "keyed": [  # API_KEY=KEY
        ("GET", "/analyze", get(file="{tmp}/photo.png"), 401),
        ("POST", "/analyze", upload, 401),
        ("GET", "/labels", {}, 401),
        ("GET", "/metrics", {}, 401),
        ("GET", "/labels", {"headers": {"Authorization": f"Bearer {KEY}"}}, 200),
        ("POST", "/analyze", {**upload, "headers": {"Authorization": f"Bearer {KEY}"}}, 200),
        ("GET", "/health", {}, 200),
        ("GET", "/", {}, 200),
        ("GET", "/static/page.js", {}, 200),
        ("GET", "/openapi.json", {}, 200),
    ],
    "loading": [
        ("GET", "/health", {}, 503),
        ("POST", "/analyze", upload, 503),
        ("GET", "/analyze", get(file="{tmp}/photo.png"), 503),
        ("GET", "/labels", {}, 503),
    ],
    "failed": [
        ("GET", "/health", {}, 503),
        ("POST", "/analyze", upload, 503),
        ("GET", "/labels", {}, 503),
    ],
    "busy": [  # MAX_QUEUE=0
        ("POST", "/analyze", upload, 503),
        ("GET", "/analyze", get(url="http://images.invalid/x.png"), 503),
    ],
    "slow": [  # every forward pass takes 1 s, REQUEST_TIMEOUT=0.2
        ("POST", "/analyze", upload, 504),
        ("GET", "/analyze", get(file="{tmp}/photo.png"), 504),
    ],
    "device fault": [  # the model raises on its device
        ("POST", "/analyze", upload, 503),
        ("GET", "/analyze", get(file="{tmp}/photo.png"), 503),
        ("GET", "/health", {}, 503),  # loaded, but inference failing
    ],
}


def scenario_app(name, make_app, settings, tiny_engine, tmp_path):
    """The app of a scenario, and what to do once its requests are sent."""
    replace = dataclasses.replace
    if name == "small":
        return make_app(replace(settings, max_image_bytes=LIMIT), engine=tiny_engine), None
    if name == "keyed":
        return make_app(replace(settings, api_key=KEY), engine=tiny_engine), None
    if name == "loading":
        engine = GatedEngine(tiny_engine)
        return make_app(settings, engine=engine, wait=False), engine.gate.set
    if name == "failed":
        return make_app(replace(settings, clip_model=f"local-dir:{broken_model_dir(tmp_path)}")), None
    if name == "busy":
        return make_app(replace(settings, max_queue=0), engine=tiny_engine), None
    if name == "slow":
        return make_app(replace(settings, request_timeout=0.2), engine=SlowEngine(tiny_engine, 1.0)), None
    if name == "device fault":
        engine = DeviceFaultEngine(tiny_engine)
        app = make_app(settings, engine=engine)
        engine.failing.set()
        return app, None
    return make_app(settings, engine=tiny_engine), None


def send_raw_query(app, method: str, path: str, raw: bytes) -> schemathesis.Response:
    """The answer to a query string of raw bytes (as WSGI passes it: decoded as Latin-1), as schemathesis
    records answers; werkzeug's own record of such a request cannot be read back."""
    files = {"data": {"file": (io.BytesIO(PNG), "x.png")}} if method == "POST" else {}
    environ = {"QUERY_STRING": raw.decode("latin-1")}
    answer = app.test_client().open(path, method=method, environ_overrides=environ, **files)
    sent = requests.Request(method, f"http://localhost{path}?{quote(raw, safe='=&')}").prepare()
    headers = {name: answer.headers.getlist(name) for name, _ in answer.headers}
    return schemathesis.Response(status_code=answer.status_code, headers=headers, content=answer.get_data(),
                                 request=sent, elapsed=0.0, verify=False)


def _with_tmp(value, tmp_path):
    return value.replace("{tmp}", str(tmp_path)) if isinstance(value, str) else value


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_documented_answer_matches(scenario, make_app, settings, tiny_engine, tmp_path,
                                         refused_beyond_loopback):
    (tmp_path / "photo.png").write_bytes(PNG)
    (tmp_path / "big.png").write_bytes(PNG + b"\0" * LIMIT)
    app, finish = scenario_app(scenario, make_app, settings, tiny_engine, tmp_path)
    table = SCENARIOS[scenario]
    api = schemathesis.openapi.from_wsgi("/openapi.json", app, config=schemathesis_config(
        *{status for *_, status in table if status >= 500}))
    try:
        for method, path, request, expected in table:
            query = {name: _with_tmp(value, tmp_path) for name, value in request.get("query", {}).items()}
            body = {key: request[key] for key in ("body", "media_type") if key in request}
            case = api[path][method].Case(query=query, headers=request.get("headers"), **body)
            if "raw_query" in request:  # beyond what a Case can send: through Flask's client, checked alike
                answer = send_raw_query(app, method, path, request["raw_query"])
                case.validate_response(answer, checks=CHECKS)
            else:
                answer = case.call_and_validate(checks=CHECKS)
            status, retry_after = answer.status_code, answer.headers.get("retry-after", [None])[0]
            assert status == expected, (method, path, request, answer.text[:300])
            if status == 503 and path != "/health":
                assert int(retry_after) >= 1
    finally:
        if finish:
            finish()


def test_every_documented_status_is_answered_somewhere():
    """The table above reaches every status the description names, but 500 (only a bug causes one)."""
    documented = {(method.upper(), path, int(status))
                  for path, item in openapi_description()["paths"].items()
                  for method, operation in item.items() for status in operation["responses"]}
    answered = {(method, path, status) for requests in SCENARIOS.values()
                for method, path, _, status in requests}
    unreachable = {(method, path, 500) for method, path in OPERATIONS}
    assert answered <= documented
    assert documented - unreachable == answered
