"""Who may call the service (http/access.py): API_KEY (Bearer) on every route but /health and /, and
CORS_ORIGINS."""

from __future__ import annotations

import dataclasses
import io

import pytest

from tests.support.images import image_bytes
from tests.support.responses import assert_error, assert_success, upload

KEY = "s3cret-key-0123456789"


@pytest.fixture
def keyed(make_app, settings, tiny_engine):
    return make_app(dataclasses.replace(settings, api_key=KEY), engine=tiny_engine).test_client()


def auth(value: str) -> dict:
    return {"Authorization": value}


def test_analyze_needs_the_key(keyed):
    assert_error(upload(keyed, image_bytes()), 401, "Authorization: Bearer")
    assert KEY not in keyed.post("/analyze").get_data(as_text=True)


@pytest.mark.parametrize("header", [
    "Bearer wrong-key",
    f"Bearer {KEY}x",
    f"Bearer {KEY[:-1]}",
    "Bearer ",
    "Bearer",
    KEY,
    f"Basic {KEY}",
    f"Token {KEY}",
    f"Bearer{KEY}",
])
def test_wrong_or_malformed_key_is_401(keyed, header):
    response = keyed.post("/analyze", data={"file": (io.BytesIO(image_bytes()), "x.png")},
                          content_type="multipart/form-data", headers=auth(header))
    assert_error(response, 401, "API key")


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_right_key_is_accepted_whatever_the_scheme_case(keyed, scheme):
    response = keyed.post("/analyze", data={"file": (io.BytesIO(image_bytes()), "x.png")},
                          content_type="multipart/form-data", headers=auth(f"{scheme} {KEY}"))
    assert_success(response)


def test_key_in_the_query_string_is_not_a_key(keyed):
    assert_error(keyed.get("/analyze", query_string={"api_key": KEY, "file": "/x.png"}), 401)


def test_open_paths_need_no_key_and_the_rest_do(keyed):
    health = keyed.get("/health")
    assert health.status_code == 200 and health.get_json()["status"] == "healthy"
    assert keyed.get("/").status_code == 200
    for path in ("/labels", "/metrics", "/analyze"):
        assert_error(keyed.get(path), 401)
        assert keyed.get(path, headers=auth(f"Bearer {KEY}")).status_code != 401
    assert keyed.get("/labels", headers=auth(f"Bearer {KEY}")).status_code == 200
    assert keyed.get("/metrics", headers=auth(f"Bearer {KEY}")).status_code == 200


def test_no_key_configured_means_open(make_app, settings, tiny_engine):
    client = make_app(settings, engine=tiny_engine).test_client()
    assert_success(upload(client, image_bytes()))


def test_cors_star_allows_any_origin(make_app, settings, tiny_engine):
    client = make_app(dataclasses.replace(settings, cors_origins=("*",)), engine=tiny_engine).test_client()
    response = client.get("/health", headers={"Origin": "https://anywhere.example"})
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    response = client.post("/analyze", data={"file": (io.BytesIO(image_bytes()), "x.png")},
                           content_type="multipart/form-data", headers={"Origin": "https://x.example"})
    assert_success(response)
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Origin" not in client.get("/health").headers, "no Origin, no CORS"


def test_cors_listed_origins_only(make_app, settings, tiny_engine):
    client = make_app(dataclasses.replace(settings, cors_origins=("https://a.example",)),
                      engine=tiny_engine).test_client()
    allowed = client.get("/health", headers={"Origin": "https://a.example"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://a.example"
    assert "Origin" in allowed.headers.get("Vary", "")
    refused = client.get("/health", headers={"Origin": "https://b.example"})
    assert refused.status_code == 200  # CORS is the browser's rule; the server only withholds the header
    assert "Access-Control-Allow-Origin" not in refused.headers
    assert "Origin" in refused.headers.get("Vary", ""), "caches must not reuse a/b answers for each other"
    lookalike = client.get("/health", headers={"Origin": "https://a.example.evil.example"})
    assert "Access-Control-Allow-Origin" not in lookalike.headers


def test_cors_empty_allows_no_origin(make_app, settings, tiny_engine):
    client = make_app(dataclasses.replace(settings, cors_origins=()), engine=tiny_engine).test_client()
    response = client.get("/health", headers={"Origin": "https://a.example"})
    assert "Access-Control-Allow-Origin" not in response.headers


@pytest.mark.parametrize("cors_origins, origin, allowed", [
    (("*",), "https://a.example", "*"),
    (("https://a.example",), "https://a.example", "https://a.example"),
])
def test_preflight_works_without_the_key(make_app, settings, tiny_engine, cors_origins, origin, allowed):
    client = make_app(dataclasses.replace(settings, api_key=KEY, cors_origins=cors_origins),
                      engine=tiny_engine).test_client()
    response = client.options("/analyze", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == allowed
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    allowed_headers = response.headers["Access-Control-Allow-Headers"].lower()
    assert "authorization" in allowed_headers and "content-type" in allowed_headers


def test_401_is_readable_by_an_allowed_origin(make_app, settings, tiny_engine):
    """A browser page must be able to read why it was refused."""
    client = make_app(dataclasses.replace(settings, api_key=KEY, cors_origins=("https://a.example",)),
                      engine=tiny_engine).test_client()
    response = client.post("/analyze", headers={"Origin": "https://a.example"})
    assert_error(response, 401)
    assert response.headers["Access-Control-Allow-Origin"] == "https://a.example"


def test_by_default_other_pages_get_nothing_and_the_service_does_no_work(make_app, settings, tiny_engine,
                                                                         tmp_path):
    """A page on another site asks for a file's classification: refused before the file is read."""
    client = make_app(settings, engine=tiny_engine).test_client()
    photo = tmp_path / "photo.png"
    photo.write_bytes(image_bytes())
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Origin": "http://localhost.evil.example"}):
        response = client.get("/analyze", query_string={"file": str(photo)}, headers=headers)
        assert_error(response, 403, "CORS_ORIGINS")
        assert "Access-Control-Allow-Origin" not in response.headers
    same_origin = client.post("/analyze", data={"file": (io.BytesIO(image_bytes()), "x.png")},
                              content_type="multipart/form-data",
                              headers={"Origin": "http://localhost", "Sec-Fetch-Site": "same-origin"})
    assert_success(same_origin)
    assert_success(client.get("/analyze", query_string={"file": str(photo)}))  # curl, scripts


@pytest.mark.parametrize(("private", "allowed_hosts", "host", "answered"), [
    (True, (), "localhost:7778", True),
    (True, (), "127.0.0.1:7778", True),
    (True, (), "[::1]:7778", True),
    (True, (), "LOCALHOST.", True),
    (True, (), "rebound.evil.example:7778", False),
    (True, (), "127.0.0.1.nip.io", False),
    (False, (), "clip.example.com", True),
    (False, ("clip.example.com",), "clip.example.com:443", True),
    (False, ("clip.example.com",), "evil.example", False),
    (True, ("*",), "anything.example", True),
])
def test_host_allow_list_defeats_dns_rebinding(make_app, settings, tiny_engine, private, allowed_hosts,
                                               host, answered):
    client = make_app(dataclasses.replace(settings, private=private, allowed_hosts=allowed_hosts),
                      engine=tiny_engine).test_client()
    for path in ("/health", "/labels", "/"):
        response = client.get(path, headers={"Host": host})
        if answered:
            assert response.status_code == 200, (path, host)
        else:
            assert_error(response, 400, "ALLOWED_HOSTS")


def test_every_answer_says_nosniff(make_app, settings, tiny_engine):
    client = make_app(settings, engine=tiny_engine).test_client()
    for response in (client.get("/health"), client.get("/labels"), client.get("/metrics"),
                     client.get("/analyze"), client.get("/nowhere"), client.get("/")):
        assert response.headers["X-Content-Type-Options"] == "nosniff", response.request.path
