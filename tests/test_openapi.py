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
import time
from collections import Counter
from pathlib import Path
from urllib.parse import quote, urlencode

import hypothesis
import jsonschema_rs
import pytest
import requests
import schemathesis
import torch
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

from clip_service.engines.spec import model_identity
from clip_service.http.access import OPEN_PATHS
from clip_service.http.front_door import ARRIVED_KEY
from clip_service.http.limits import MULTIPART_OVERHEAD
from clip_service.http.openapi import FRONT_DOOR_ANSWERS, openapi_description
from clip_service.library.photo_index import write_index
from clip_service.settings import Settings
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
    # a 500 fails inside run_schemathesis: CHECKS starts with not_a_server_error
    assert sum(statuses.values()) >= 10, statuses


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
uploads = form(file=[PNG, PNG])
json_texts = {"body": {"texts": ["cat", "a red circle"], "prompts": True}, "media_type": "application/json"}
raw_png = {"body": PNG, "media_type": "application/octet-stream"}
MANY_LIMIT = Settings().batch_files_max * LIMIT + MULTIPART_OVERHEAD  # a body of many images, "small"


def aliases(rows: list[tuple]) -> list[tuple]:
    """/analyze's rows for /v3/analyze, and its GET rows for the /v2 routes with their parameter names."""
    copied = []
    for method, path, request, status in rows:
        if path != "/analyze":
            continue
        copied.append((method, "/v3/analyze", request, status))
        query = request.get("query", {})
        for v2_path, old, new in (("/v2/analyze", "url", "image_url"),
                                  ("/v2/analyze_file", "file", "file_path")):
            if method == "GET" and old in query:
                renamed = {(new if name == old else name): value for name, value in query.items()}
                copied.append(("GET", v2_path, {**request, "query": renamed}, status))
    return copied


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
        ("POST", "/analyze", raw_png, 200),
        ("POST", "/analyze/batch", uploads, 200),
        ("POST", "/analyze/batch", form(file=[PNG, b"not an image"], limit=1), 200),
        ("POST", "/analyze/batch", form(file=[PNG], groups="nope"), 400),
        ("GET", "/embed", get(text=["cat", "dog"], encoding="base64"), 200),
        ("GET", "/embed", get(file="{tmp}/photo.png"), 200),
        ("GET", "/embed", get(file="{tmp}/absent.png"), 404),
        ("GET", "/embed", get(file="/etc/hostname"), 403),
        ("GET", "/embed", get(url="http://images.invalid/x.png"), 502),
        ("GET", "/embed", get(text="cat", file="{tmp}/photo.png"), 400),
        ("POST", "/embed", json_texts, 200),
        ("POST", "/embed", uploads, 200),
        ("POST", "/embed", raw_png, 200),
        ("POST", "/embed", {"body": {"texts": []}, "media_type": "application/json"}, 400),
        ("GET", "/search", get(q="red"), 404),  # no SEARCH_INDEX here
        ("POST", "/search", upload, 404),
        ("GET", "/search/index", {}, 404),
        ("GET", "/search/thumbnail", get(path="photo.png"), 404),
        *[(method, path, NOT_UTF8, 400) for method, path in OPERATIONS],
    ],
    "search": [  # SEARCH_INDEX={tmp}/photos.clipindex of {tmp}, MAX_IMAGE_BYTES=LIMIT
        ("GET", "/search", get(q="a red circle", k=3), 200),
        ("GET", "/search", get(q="red", k=0), 400),
        ("GET", "/search", {**get(q="red"), "late": True}, 504),
        ("POST", "/search", upload, 200),
        ("POST", "/search", raw_png, 200),
        ("POST", "/search", form(file=b"not an image"), 400),
        ("POST", "/search", form(file=b"x" * (LIMIT + 70_000)), 413),
        ("POST", "/search", {**upload, "late": True}, 504),
        ("GET", "/search/index", {}, 200),
        ("GET", "/search/thumbnail", get(path="photo.png"), 200),
        ("GET", "/search/thumbnail", get(path="big.png"), 413),
        ("GET", "/search/thumbnail", get(path="link.png"), 403),
        ("GET", "/search/thumbnail", get(path="absent.png"), 404),
        ("GET", "/search/thumbnail", get(path="../photo.png"), 404),
        ("GET", "/search/thumbnail", get(path=""), 400),
        ("GET", "/search/thumbnail", {**get(path="photo.png"), "late": True}, 504),
    ],
    "fetching": [  # URL_ALLOWLIST=127.0.0.1 and MAX_IMAGE_BYTES=LIMIT, a server with a small and a big image
        ("GET", "/v2/analyze", get(image_url="{server}/photo.png"), 200),
        ("GET", "/v2/analyze", get(image_url="{server}/big.png"), 413),
        ("GET", "/embed", get(url="{server}/big.png"), 413),
    ],
    "small": [  # MAX_IMAGE_BYTES=LIMIT
        ("POST", "/analyze", form(file=b"x" * (LIMIT + 1)), 413),
        ("POST", "/analyze", form(file=b"x" * (LIMIT + 70_000)), 413),  # over MAX_CONTENT_LENGTH, unread
        ("GET", "/analyze", get(file="{tmp}/big.png"), 413),
        ("POST", "/analyze/batch", form(file=[b"x" * (MANY_LIMIT + 1)]), 413),
        ("POST", "/embed", form(file=[b"x" * (MANY_LIMIT + 1)]), 413),
        ("GET", "/embed", get(file="{tmp}/big.png"), 413),
    ],
    "keyed": [  # API_KEY=KEY
        ("GET", "/analyze", get(file="{tmp}/photo.png"), 401),
        ("GET", "/analyze", get(url="http://images.invalid/x.png"), 401),
        ("POST", "/analyze", upload, 401),
        ("GET", "/labels", {}, 401),
        ("GET", "/metrics", {}, 401),
        ("GET", "/labels", {"headers": {"Authorization": f"Bearer {KEY}"}}, 200),
        ("POST", "/analyze", {**upload, "headers": {"Authorization": f"Bearer {KEY}"}}, 200),
        ("GET", "/health", {}, 200),
        ("GET", "/", {}, 200),
        ("GET", "/static/page.js", {}, 200),
        ("GET", "/openapi.json", {}, 200),
        ("POST", "/analyze/batch", uploads, 401),
        ("GET", "/embed", get(text="cat"), 401),
        ("POST", "/embed", json_texts, 401),
        ("GET", "/search", get(q="red"), 401),
        ("POST", "/search", upload, 401),
        ("GET", "/search/index", {}, 401),
        ("GET", "/search/thumbnail", get(path="photo.png"), 401),
    ],
    "loading": [
        ("GET", "/health", {}, 503),
        ("POST", "/analyze", upload, 503),
        ("GET", "/analyze", get(file="{tmp}/photo.png"), 503),
        ("GET", "/labels", {}, 503),
        ("POST", "/analyze/batch", uploads, 503),
        ("GET", "/embed", get(text="cat"), 503),
        ("POST", "/embed", json_texts, 503),
        ("GET", "/search", get(q="red"), 503),
        ("POST", "/search", upload, 503),
        ("GET", "/search/index", {}, 503),
        ("GET", "/search/thumbnail", get(path="photo.png"), 503),
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
    "slow": [  # every forward pass takes 1 s, REQUEST_TIMEOUT=0.2, URL_ALLOWLIST=127.0.0.1
        ("POST", "/analyze", upload, 504),
        ("GET", "/analyze", get(file="{tmp}/photo.png"), 504),
        ("GET", "/v2/analyze", get(image_url="{server}/photo.png"), 504),
        ("POST", "/analyze/batch", uploads, 504),
        ("GET", "/embed", get(file="{tmp}/photo.png"), 504),
        ("POST", "/embed", uploads, 504),
    ],
    "device fault": [  # the model raises on its device
        ("POST", "/analyze", upload, 503),
        ("GET", "/analyze", get(file="{tmp}/photo.png"), 503),
        ("GET", "/health", {}, 503),  # loaded, but inference failing
    ],
}
for _rows in SCENARIOS.values():
    _rows += aliases(_rows)


WITH_INDEX = {"search", "keyed", "loading"}


def photo_index(settings, folder) -> Path:
    """An index of the tiny model over folder: a photo, one too big, one that leads outside, one gone."""
    (folder / "link.png").symlink_to("/etc/hostname")
    paths = ["absent.png", "big.png", "link.png", "photo.png"]
    vectors = torch.nn.functional.normalize(torch.randn(len(paths), 32), dim=-1).numpy()
    index = folder / "photos.clipindex"
    write_index(index, folder, settings.clip_model, model_identity(settings.model_spec), paths, vectors)
    return index


def scenario_app(name, make_app, settings, tiny_engine, tmp_path):
    """The app of a scenario, and what to do once its requests are sent."""
    replace = dataclasses.replace
    if name in WITH_INDEX:
        settings = replace(settings, search_index=photo_index(settings, tmp_path))
    if name == "search":
        return make_app(replace(settings, max_image_bytes=LIMIT), engine=tiny_engine), None
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
        slow = replace(settings, request_timeout=0.2, url_allowlist=("127.0.0.1",))
        return make_app(slow, engine=SlowEngine(tiny_engine, 1.0)), None
    if name == "fetching":
        fetching = replace(settings, max_image_bytes=LIMIT, url_allowlist=("127.0.0.1",))
        return make_app(fetching, engine=tiny_engine), None
    if name == "device fault":
        engine = DeviceFaultEngine(tiny_engine)
        app = make_app(settings, engine=engine)
        engine.failing.set()
        return app, None
    return make_app(settings, engine=tiny_engine), None


def send_raw_query(app, method: str, path: str, raw: bytes, environ: dict | None = None,
                   ) -> schemathesis.Response:
    """The answer to a query string of raw bytes (as WSGI passes it: decoded as Latin-1), as schemathesis
    records answers; werkzeug's own record of such a request cannot be read back. `environ` adds to
    the WSGI environ."""
    files = {"data": {"file": (io.BytesIO(PNG), "x.png")}} if method == "POST" else {}
    environ = {"QUERY_STRING": raw.decode("latin-1"), **(environ or {})}
    answer = app.test_client().open(path, method=method, environ_overrides=environ, **files)
    sent = requests.Request(method, f"http://localhost{path}?{quote(raw, safe='=&')}").prepare()
    headers = {name: answer.headers.getlist(name) for name, _ in answer.headers}
    return schemathesis.Response(status_code=answer.status_code, headers=headers, content=answer.get_data(),
                                 request=sent, elapsed=0.0, verify=False)


def _with_tmp(value, tmp_path, server):
    """A query value with {tmp} (the allowed root) and {server} (the local image server) filled in."""
    if isinstance(value, list):
        return [_with_tmp(item, tmp_path, server) for item in value]
    if not isinstance(value, str):
        return value
    return value.replace("{tmp}", str(tmp_path)).replace("{server}", f"http://127.0.0.1:{server.port}")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_documented_answer_matches(scenario, make_app, settings, tiny_engine, tmp_path,
                                         refused_beyond_loopback, local_server):
    (tmp_path / "photo.png").write_bytes(PNG)
    (tmp_path / "big.png").write_bytes(PNG + b"\0" * LIMIT)
    local_server.routes.update({"/photo.png": (200, {}, PNG), "/big.png": (200, {}, PNG + b"\0" * LIMIT)})
    app, finish = scenario_app(scenario, make_app, settings, tiny_engine, tmp_path)
    table = SCENARIOS[scenario]
    api = schemathesis.openapi.from_wsgi("/openapi.json", app, config=schemathesis_config(
        *{status for *_, status in table if status >= 500}))
    try:
        for method, path, request, expected in table:
            query = {name: _with_tmp(value, tmp_path, local_server)
                     for name, value in request.get("query", {}).items()}
            body = {key: request[key] for key in ("body", "media_type") if key in request}
            case = api[path][method].Case(query=query, headers=request.get("headers"), **body)
            if "raw_query" in request:  # beyond what a Case can send: through Flask's client, checked alike
                answer = send_raw_query(app, method, path, request["raw_query"])
                case.validate_response(answer, checks=CHECKS)
            elif request.get("late"):  # arrived REQUEST_TIMEOUT ago, as the front door would stamp it
                raw = urlencode(query, doseq=True).encode()
                answer = send_raw_query(app, method, path, raw, {ARRIVED_KEY: time.monotonic() - 3600})
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
    """The table above reaches every status the description names, but 500 and the front door's."""
    documented = {(method.upper(), path, int(status))
                  for path, item in openapi_description()["paths"].items()
                  for method, operation in item.items() for status in operation["responses"]}
    answered = {(method, path, status) for requests in SCENARIOS.values()
                for method, path, _, status in requests}
    # 500 only a bug causes; the front door's own answers come from CLIP.sh alone (test_one_laptop.py)
    unreachable = {(method, path, status) for method, path in OPERATIONS
                   for status in (500, *map(int, FRONT_DOOR_ANSWERS))}
    assert answered <= documented
    assert documented - unreachable == answered


@pytest.mark.system
@pytest.mark.parametrize("method, path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_schemathesis_finds_nothing_through_clip_sh(clip_sh, method, path):
    """The same generated cases through the session's CLIP.sh: the front door's and gunicorn's answers
    are held to the description too. Its fence refuses connections beyond loopback: 502, as above."""
    api = schemathesis.openapi.from_url(f"{clip_sh.base}/openapi.json", config=schemathesis_config(502))
    statuses = Counter()

    def check(case):
        statuses[case.call_and_validate(checks=CHECKS, timeout=30).status_code] += 1

    test = build_operation_test(config=api.config, operation=api[path][method], test_func=check,
                                given_kwargs={}, feedback=FeedbackSources(), explicit_settings=FUZZ_SETTINGS)
    test()
    assert sum(statuses.values()) >= 10, statuses
