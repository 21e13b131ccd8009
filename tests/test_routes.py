"""The HTTP contract of /analyze (http/analyze.py) through Flask's test client: every success and error
row."""

import dataclasses
import io

import pytest

from tests.support.engines import DeviceFaultEngine, GatedEngine
from tests.support.images import image_bytes, png_declaring
from tests.support.responses import assert_error, assert_success, upload


def test_health_when_loaded(client, tiny_model_dir):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.get_json() == {"status": "healthy", "model_status": "loaded", "device": "cpu",
                                   "num_labels": 10, "model": f"local-dir:{tiny_model_dir.name}"}


def test_upload_success_shape_and_emoji(client):
    body = assert_success(upload(client, image_bytes()))
    predictions = {p["label"]: p for p in body["predictions"]}
    assert len(predictions) == 10  # threshold 0 in the test settings, ten labels
    assert predictions["cat"]["emoji"] == "🐱"
    assert "emoji" not in predictions["astronaut"]
    assert sum(p["confidence"] for p in predictions.values()) == pytest.approx(1.0, abs=0.01)


def test_threshold_and_limit_apply(make_app, settings):
    client = make_app(dataclasses.replace(settings, max_predictions=3)).test_client()
    body = assert_success(upload(client, image_bytes()))
    assert len(body["predictions"]) == 3
    client = make_app(dataclasses.replace(settings, confidence_threshold=1.0)).test_client()
    assert assert_success(upload(client, image_bytes()))["predictions"] == []


def test_file_input(client, settings, tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(image_bytes("JPEG"))
    assert_success(client.get("/analyze", query_string={"file": str(path)}))


def test_same_answer_for_every_input(make_app, settings, tmp_path, local_server):
    client = make_app(dataclasses.replace(settings, url_allowlist=("127.0.0.1",))).test_client()
    data = image_bytes("PNG", (200, 150), (10, 120, 240))
    (tmp_path / "same.png").write_bytes(data)
    local_server.routes["/same"] = (200, {"Content-Type": "application/octet-stream"}, data)
    answers = [
        assert_success(upload(client, data))["predictions"],
        assert_success(client.get("/analyze", query_string={"file": str(tmp_path / "same.png")}))[
            "predictions"],
        assert_success(client.get("/analyze", query_string={"url": local_server.url("/same")}))[
            "predictions"],
    ]
    assert answers[0] == answers[1] == answers[2]


@pytest.mark.parametrize("query, fragment", [
    ({}, "got none"),
    ({"url": "http://a.example/x.jpg", "file": "/tmp/x.jpg"}, "got url and file"),
    ({"url": ["http://a.example/1.jpg", "http://a.example/2.jpg"]}, "Give url only once"),
    ({"file": ["/a.jpg", "/b.jpg"]}, "Give file only once"),
    ({"url": "ftp://a.example/x.jpg"}, "scheme must be http or https"),
    ({"url": "http://"}, "Malformed URL"),
    ({"url": "http://[::1"}, "Malformed URL"),
    ({"file": "relative/photo.jpg"}, "absolute path"),
    ({"file": "/tmp/a\x00b.jpg"}, "NUL"),
])
def test_bad_parameters_are_400(client, query, fragment):
    assert_error(client.get("/analyze", query_string=query), 400, fragment)


def test_upload_plus_query_input_is_two_inputs(client):
    response = client.post("/analyze?url=http://a.example/x.jpg",
                           data={"file": (io.BytesIO(image_bytes()), "x.png")})
    assert_error(response, 400, "got url and upload")


@pytest.mark.parametrize("kwargs, fragment", [
    ({"data": b"raw bytes", "content_type": "text/plain"}, "multipart/form-data"),
    ({"data": b"raw bytes", "content_type": "image/png"}, "Not an image"),
    ({"json": {"url": "http://a.example/x.jpg"}}, "multipart/form-data"),
    ({"data": {"image": (io.BytesIO(b"x"), "x.png")}, "content_type": "multipart/form-data"},
     "no field named file"),
    ({"data": {"file": [(io.BytesIO(b"a"), "a.png"), (io.BytesIO(b"b"), "b.png")]},
      "content_type": "multipart/form-data"}, "2 were sent"),
])
def test_bad_posts_are_400(client, kwargs, fragment):
    assert_error(client.post("/analyze", **kwargs), 400, fragment)


@pytest.mark.parametrize("data, fragment", [
    (b"", "empty"),
    (b"just some text, not an image", "Not an image"),
    (b"<html><body>hi</body></html>", "Not an image"),
    (image_bytes("TIFF"), "Not an image, or an unsupported format"),
    (image_bytes("JPEG")[:200], "could not be decoded"),
])
def test_not_an_image_is_400(client, data, fragment):
    assert_error(upload(client, data), 400, fragment)


def test_decompression_bomb_is_400(client):
    bomb = png_declaring(30000, 30000)
    assert len(bomb) < 5000
    assert_error(upload(client, bomb), 400, "30000x30000")


def test_size_limit_on_all_three_inputs(make_app, settings, tmp_path, local_server):
    limited = dataclasses.replace(settings, max_image_bytes=20_000, url_allowlist=("127.0.0.1",))
    client = make_app(limited).test_client()
    big = image_bytes("BMP", (200, 200))  # 120 kB
    assert_error(upload(client, big), 413)
    (tmp_path / "big.bmp").write_bytes(big)
    assert_error(client.get("/analyze", query_string={"file": str(tmp_path / "big.bmp")}), 413,
                 "MAX_IMAGE_BYTES")
    local_server.routes["/big"] = (200, {}, big)
    assert_error(client.get("/analyze", query_string={"url": local_server.url("/big")}), 413,
                 "MAX_IMAGE_BYTES")


def test_file_errors(client, tmp_path):
    assert_error(client.get("/analyze", query_string={"file": str(tmp_path / "absent.jpg")}), 404,
                 f"File not found: {tmp_path / 'absent.jpg'}")
    assert_error(client.get("/analyze", query_string={"file": "/etc/hostname"}), 403,
                 "ALLOWED_FILE_ROOTS")
    escape = f"{tmp_path}/../../../../etc/hostname"
    assert_error(client.get("/analyze", query_string={"file": escape}), 403, "outside")


def test_file_input_refused_on_public_service_without_roots(make_app, settings, tmp_path):
    client = make_app(dataclasses.replace(settings, allowed_file_roots=())).test_client()
    (tmp_path / "x.png").write_bytes(image_bytes())
    assert_error(client.get("/analyze", query_string={"file": str(tmp_path / "x.png")}), 403,
                 "ALLOWED_FILE_ROOTS")


def test_private_service_without_roots_reads_any_file(make_app, settings, tmp_path):
    client = make_app(dataclasses.replace(settings, allowed_file_roots=(), private=True)).test_client()
    (tmp_path / "x.png").write_bytes(image_bytes())
    assert_success(client.get("/analyze", query_string={"file": str(tmp_path / "x.png")}))


def test_url_errors(client, local_server, network_fence):
    assert_error(client.get("/analyze", query_string={"url": local_server.url("/x.png")}), 403,
                 "loopback", "URL_ALLOWLIST")
    assert_error(client.get("/analyze", query_string={"url": "http://169.254.169.254/latest/"}), 403,
                 "link-local")
    assert local_server.hits == [] and network_fence == []


def test_url_upstream_failures_are_502(make_app, settings, local_server):
    client = make_app(dataclasses.replace(settings, url_allowlist=("127.0.0.1",))).test_client()
    assert_error(client.get("/analyze", query_string={"url": local_server.url("/missing")}), 502,
                 "HTTP 404")
    closed = f"http://127.0.0.1:{local_server.port + 1 if local_server.port < 65535 else 1}/x"
    assert_error(client.get("/analyze", query_string={"url": closed}), 502)


def test_unexpected_error_is_500_without_details(client, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("secret internal detail")

    monkeypatch.setattr("clip_service.http.analyze.parse_options", broken)
    message = assert_error(upload(client, image_bytes()), 500)
    assert "secret" not in message and "Internal error" in message


def test_werkzeug_errors_use_the_error_shape(client):
    assert_error(client.get("/no-such-route"), 404)
    assert_error(client.delete("/analyze"), 405)
    assert_error(client.put("/health"), 405)


def test_health_says_loading_until_loaded(make_app, settings, tiny_engine):
    engine = GatedEngine(tiny_engine)
    app = make_app(settings, engine=engine, wait=False)
    client = app.test_client()
    response = client.get("/health")
    assert response.status_code == 503
    assert response.get_json()["model_status"] == "loading"
    assert_error(upload(client, image_bytes()), 503, "loading")
    engine.gate.set()
    assert app.extensions["clip_service"].wait_until_settled(30)
    assert client.get("/health").status_code == 200


def test_failed_load_is_unhealthy_not_healthy(make_app, settings, tmp_path):
    folder = tmp_path / "broken-model"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text('{"model_cfg": {"embed_dim": 8}}')
    (folder / "open_clip_model.safetensors").write_bytes(b"not weights")
    client = make_app(dataclasses.replace(settings, clip_model=f"local-dir:{folder}")).test_client()
    response = client.get("/health")
    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] == "unhealthy" and body["model_status"] == "failed"
    assert "could not be loaded" in body["error"]
    assert_error(upload(client, image_bytes()), 503, "failed to load")


def test_a_failed_load_says_why_without_the_servers_paths(make_app, settings, tiny_engine, tmp_path):
    """A worker restarting after a label file went bad: /health says which file and why, by its name."""
    folder = tmp_path / "labels-of-a-server"
    folder.mkdir()
    (folder / "animals.txt").write_bytes(b"caf\xe9\n")
    client = make_app(dataclasses.replace(settings, labels_dir=folder), engine=tiny_engine).test_client()
    body = client.get("/health").get_json()
    assert body["model_status"] == "failed"
    assert body["error"] == "LabelsError: The label file animals.txt is not UTF-8 (byte 3); save it as UTF-8"
    # the routes that need the model say the same, not the full path /health leaves out
    for response in (upload(client, image_bytes()), client.get("/embed", query_string={"text": "a cat"}),
                     client.get("/labels")):
        assert_error(response, 503, "failed to load: LabelsError: The label file animals.txt is not UTF-8")
        assert str(folder) not in response.get_data(as_text=True)


def test_failing_model_is_503_without_details(make_app, settings, tiny_engine):
    engine = DeviceFaultEngine(tiny_engine)
    engine.failing.set()
    client = make_app(settings, engine=engine).test_client()
    response = upload(client, image_bytes())
    message = assert_error(response, 503, "model failed on this image")
    assert "device-side" not in message and response.headers["Retry-After"]
    health = client.get("/health")
    assert health.status_code == 503, "a failing model is not healthy"
    assert "Inference is failing" in health.get_json()["error"]


def test_the_route_table_declares_every_route_the_app_serves_with_its_methods(app):
    """The door, access control, the body limits and the API description read http/routes.py: a route
    the app serves but the table lacks would be treated as unknown (the light lane, no body limit)."""
    from clip_service.http.routes import BY_PATH

    served = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint != "static":
            served.setdefault(rule.rule, set()).update(rule.methods - {"HEAD", "OPTIONS"})
    served.update({f"/static/{name}": {"GET"} for name in ("page.css", "page.js")})
    assert {path: set(route.methods) for path, route in BY_PATH.items()} == served
