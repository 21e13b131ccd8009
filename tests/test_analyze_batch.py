"""POST /analyze/batch and the drop-in aliases of /analyze (http/analyze.py), through Flask's test client.

(tests/test_dropin.py sends the orchestrator's own calls to the real server started by CLIP.sh.)
"""

from __future__ import annotations

import dataclasses
import io
import os
import weakref

import pytest

from clip_service.cores import MAX_THREADS
from clip_service.http.limits import MULTIPART_OVERHEAD
from clip_service.inputs import images
from tests.support.images import image_bytes
from tests.support.responses import assert_error, assert_success, upload

COLOURS = [(200, 30, 30), (30, 40, 210), (30, 200, 40), (230, 220, 30), (120, 120, 120)]


def files(*datas: bytes) -> dict:
    return {"data": {"file": [(io.BytesIO(data), f"{index}.png") for index, data in enumerate(datas)]},
            "content_type": "multipart/form-data"}


def batch_results(response) -> list[dict]:
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert set(body) == {"service", "status", "results", "metadata"}
    assert (body["service"], body["status"]) == ("clip", "success")
    assert set(body["metadata"]) == {"processing_time", "model_info"}
    return body["results"]


def same_predictions(batch: list[dict], alone: list[dict]) -> None:
    """The same labels in the same order, confidences equal to the 3rd decimal (one pass vs several)."""
    assert [p["label"] for p in batch] == [p["label"] for p in alone]
    for one, other in zip(batch, alone, strict=True):
        assert one["confidence"] == pytest.approx(other["confidence"], abs=0.0011)


def test_each_file_gets_analyzes_answer_in_order_and_a_bad_one_its_own_error(app, client):
    datas = [image_bytes(colour=colour) for colour in COLOURS[:3]]
    results = batch_results(client.post("/analyze/batch", **files(datas[0], b"not an image", *datas[1:])))
    assert len(results) == 4
    assert results[1] == {"service": "clip", "status": "error", "predictions": [],
                          "error": {"message": results[1]["error"]["message"]},
                          "metadata": {"processing_time": results[1]["metadata"]["processing_time"]}}
    assert "Not an image" in results[1]["error"]["message"]
    for result, data in zip([results[0], *results[2:]], datas, strict=True):
        assert set(result) == {"service", "status", "predictions", "metadata"}
        same_predictions(result["predictions"], assert_success(upload(client, data))["predictions"])
    assert results[0]["metadata"]["model_info"]["labels_version"]


def test_all_files_go_through_one_forward_pass_even_past_batch_max_size(app, client):
    batcher = app.extensions["clip_service"].batcher
    assert batcher.max_batch == 8  # the CPU default
    datas = [image_bytes(colour=COLOURS[index % 5], size=(60 + index, 50)) for index in range(12)]
    before = len(batcher.batch_sizes)
    results = batch_results(client.post("/analyze/batch", **files(*datas)))
    assert [result["status"] for result in results] == ["success"] * 12
    assert list(batcher.batch_sizes)[before:] == [12]


def test_options_apply_to_every_file(client):
    datas = [image_bytes(colour=colour) for colour in COLOURS[:2]]
    limited = batch_results(client.post("/analyze/batch?labels=cat,dog,red fox&limit=2", **files(*datas)))
    grouped = batch_results(client.post("/analyze/batch", data={
        "file": [(io.BytesIO(data), "x.png") for data in datas], "groups": "foods"},
        content_type="multipart/form-data"))
    nothing = batch_results(client.post("/analyze/batch?threshold=1", **files(*datas)))
    assert len(limited) == len(grouped) == len(nothing) == 2, "a result per file"
    for result in limited:
        assert len(result["predictions"]) == 2
        assert {p["label"] for p in result["predictions"]} <= {"cat", "dog", "red fox"}
    for result in grouped:
        assert {p["label"] for p in result["predictions"]} == {"banana", "coffee", "pizza"}
    assert [result["predictions"] for result in nothing] == [[], []]


def test_only_bad_files_is_still_an_answer_per_file(client):
    results = batch_results(client.post("/analyze/batch", **files(b"", b"GIF89a broken")))
    assert [result["status"] for result in results] == ["error", "error"]
    assert "empty" in results[0]["error"]["message"]


@pytest.mark.parametrize("kwargs, status, fragment", [
    ({"data": {"other": "x"}, "content_type": "multipart/form-data"}, 400, "no field named file"),
    ({"data": image_bytes(), "content_type": "image/png"}, 400, "one field named file per image"),
    ({"json": {"file": "x"}}, 400, "multipart/form-data"),
    ({**files(image_bytes()), "query_string": {"limit": "0"}}, 400, "limit="),
    ({**files(image_bytes()), "query_string": {"groups": "nope"}}, 400, "not a label group"),
])
def test_bad_batches_are_refused_whole(client, kwargs, status, fragment):
    assert_error(client.post("/analyze/batch", **kwargs), status, fragment)


def test_batch_files_max_and_the_batch_body_limit(make_app, settings):
    small = dataclasses.replace(settings, batch_files_max=3, max_image_bytes=100_000)
    client = make_app(small).test_client()
    assert_error(client.post("/analyze/batch", **files(*[image_bytes()] * 4)), 400,
                 "at most 3 images", "BATCH_FILES_MAX", "4 were sent")
    big = [image_bytes("BMP", (170, 176), colour) for colour in COLOURS[:3]]  # 89,814 bytes each
    body = len(b"".join(big))
    assert all(80_000 < len(data) < 100_000 for data in big) and body > 100_000 + MULTIPART_OVERHEAD
    assert len(batch_results(client.post("/analyze/batch", **files(*big)))) == 3
    assert client.post("/embed", **files(*big)).status_code == 200  # the other route for many images
    # the same body is too large for a route that takes one image, before any of it is decoded
    assert_error(client.post("/analyze", data={"file": (io.BytesIO(b"".join(big)), "x.bmp")},
                             content_type="multipart/form-data"), 413, "exceeds the capacity limit")


def test_get_is_405(client):
    assert_error(client.get("/analyze/batch"), 405)


# --- the drop-in aliases -----------------------------------------------------------------------------


def test_aliases_answer_exactly_as_analyze(client, tmp_path, make_app, settings, local_server):
    client = make_app(dataclasses.replace(settings, url_allowlist=("127.0.0.1",))).test_client()
    data = image_bytes("JPEG", (160, 120), COLOURS[1])
    (tmp_path / "photo.jpg").write_bytes(data)
    local_server.routes["/photo.jpg"] = (200, {"Content-Type": "image/jpeg"}, data)
    expected = assert_success(upload(client, data))["predictions"]
    answers = [
        client.post("/v3/analyze", data={"file": (io.BytesIO(data), "image.jpg", "image/jpeg")},
                    content_type="multipart/form-data"),
        client.post("/analyze", data=data, content_type="image/jpeg"),
        client.post("/v3/analyze", data=data, content_type="application/octet-stream"),
        client.get("/v2/analyze", query_string={"image_url": local_server.url("/photo.jpg")}),
        client.get("/v2/analyze_file", query_string={"file_path": str(tmp_path / "photo.jpg")}),
        client.get("/v3/analyze", query_string={"file": str(tmp_path / "photo.jpg")}),
    ]
    for response in answers:
        assert assert_success(response)["predictions"] == expected
    limited = client.get("/v2/analyze_file", query_string={"file_path": str(tmp_path / "photo.jpg"),
                                                          "limit": "2"})
    assert assert_success(limited)["predictions"] == expected[:2]


@pytest.mark.parametrize("path, query, fragment", [
    ("/v2/analyze", {}, "Give exactly one input: ?image_url=...; got none"),
    ("/v2/analyze", {"image_url": "ftp://a.example/x.jpg"}, "scheme must be http or https"),
    ("/v2/analyze", {"image_url": ["http://a.example/1", "http://a.example/2"]}, "Give image_url only once"),
    ("/v2/analyze_file", {}, "?file_path=...; got none"),
    ("/v2/analyze_file", {"file_path": "relative.jpg"}, "absolute path"),
    ("/v3/analyze", {}, "a POST upload in the field file (or as the body); got none"),
])
def test_aliases_refuse_as_analyze_does(client, path, query, fragment):
    assert_error(client.get(path, query_string=query), 400, fragment)


def test_aliases_obey_file_roots(client, tmp_path):
    assert_error(client.get("/v2/analyze_file", query_string={"file_path": "/etc/hostname"}), 403,
                 "outside the allowed folders")
    assert_error(client.get("/v2/analyze_file", query_string={"file_path": str(tmp_path / "none.jpg")}),
                 404, "File not found")
    assert_error(client.post("/v2/analyze"), 405)


@pytest.mark.parametrize("route", ["/analyze/batch", "/embed"])
def test_a_request_holds_one_full_size_image_per_core_not_all_of_them(app, client, monkeypatch, route):
    """32 large PNGs fit in a small body (they compress ~1000:1); decoded all at once they would be
    32 x 180 MB. Each is made the model's small input on the thread that decoded it, then dropped."""
    live, alive_at_prepare = set(), []
    real_decode = images._loaded_rgb

    def decode(*args, **kwargs):
        image = real_decode(*args, **kwargs)
        live.add(id(image))
        weakref.finalize(image, live.discard, id(image))
        return image

    monkeypatch.setattr(images, "_loaded_rgb", decode)
    engine = app.extensions["clip_service"].ready_classifier().engine
    real_prepare = engine.prepare

    def prepare(image):
        alive_at_prepare.append(len(live))
        return real_prepare(image)

    monkeypatch.setattr(engine, "prepare", prepare)
    response = client.post(route, **files(*[image_bytes(colour=COLOURS[index % 5], size=(300, 200))
                                            for index in range(12)]))
    assert response.status_code == 200, response.get_json()
    assert len(alive_at_prepare) == 12
    assert max(alive_at_prepare) <= min(os.cpu_count() or 1, MAX_THREADS), alive_at_prepare
