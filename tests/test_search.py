"""/search, /search/index and /search/thumbnail (http/search.py, tasks/search.py, inputs/thumbnails.py)
through Flask's test client, on the colour-trained model.

(tests/test_search_serving.py runs the same through CLIP.sh and the web page in chromium.)
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import struct
import time

import numpy as np
import pytest
import torch
from PIL import Image

from clip_service import cli
from clip_service.engines.registry import load_engine
from clip_service.engines.spec import parse_model_spec
from clip_service.errors import DeadlineExceeded, Overloaded, ServiceError
from clip_service.inputs.budget import MB, DecodeBudget
from clip_service.inputs.images import ImageLimits
from clip_service.inputs.thumbnails import thumbnail_jpeg
from clip_service.library import indexer
from clip_service.library.indexer import IndexOptions
from clip_service.library.photo_index import PhotoIndexError, read_index, write_index
from clip_service.settings import Settings
from tests.support.responses import assert_error, assert_success
from tests.support.trained_clip import COLOURS, draw_picture, write_pictures

PER_COLOUR = 6
SEARCH_KEYS = {"service", "status", "matches", "metadata"}


@pytest.fixture(scope="module")
def indexed(trained_model_dir, tmp_path_factory):
    """(folder, index file): 8 colours x 6 unseen pictures, indexed with the trained model."""
    root = tmp_path_factory.mktemp("search")
    folder = root / "photos"
    write_pictures(folder, COLOURS, PER_COLOUR)
    engine = load_engine(parse_model_spec(f"local-dir:{trained_model_dir}"), "cpu", "fp32")
    output = root / "photos.clipindex"
    indexer.run(IndexOptions(folder, output), Settings(clip_model=f"local-dir:{trained_model_dir}"),
                lambda: engine)
    return folder, output


@pytest.fixture
def search_settings(settings, trained_model_dir, indexed):
    return dataclasses.replace(settings, clip_model=f"local-dir:{trained_model_dir}", search_index=indexed[1])


@pytest.fixture
def client(make_app, search_settings):
    return make_app(search_settings).test_client()


def matches_of(response) -> list[dict]:
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert set(body) == SEARCH_KEYS and (body["service"], body["status"]) == ("clip", "success")
    assert set(body["metadata"]) == {"processing_time", "index_size", "model_info"}
    assert body["metadata"]["index_size"] == len(COLOURS) * PER_COLOUR
    scores = [match["score"] for match in body["matches"]]
    assert scores == sorted(scores, reverse=True)
    return body["matches"]


def colours(matches: list[dict]) -> list[str]:
    return [match["path"].split("/")[0] for match in matches]


def png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return buffer.getvalue()


def test_a_red_circle_finds_the_red_pictures(client, indexed):
    matches = matches_of(client.get("/search", query_string={"q": "a red circle", "k": 5}))
    assert colours(matches) == ["red"] * 5
    assert all(not match["path"].startswith("/") and ".." not in match["path"] for match in matches)
    for colour in ("green", "blue", "pink"):
        assert colours(matches_of(client.get("/search", query_string={"q": f"a {colour} square",
                                                                      "k": 3}))) == [colour] * 3
    assert len(matches_of(client.get("/search?q=red"))) == 10  # the default k


def test_a_text_query_is_encoded_exactly_as_written(make_app, search_settings, indexed):
    """/search?q= scores the index against the text tower's vector of q itself: no prompt template."""
    app = make_app(search_settings)
    engine = app.extensions["clip_service"].classifier.engine
    query = torch.nn.functional.normalize(engine.encode_texts(["a pink square"]).float(), dim=-1)[0]
    index = read_index(indexed[1])
    expected = sorted((float(score) for score in np.asarray(index.embeddings) @ query.numpy()), reverse=True)
    matches = matches_of(app.test_client().get("/search", query_string={"q": "a pink square", "k": 3}))
    assert [match["score"] for match in matches] == pytest.approx(expected[:3], abs=1e-4)


def test_a_photo_finds_photos_like_it(client):
    blue = png(draw_picture("blue", "triangle", 96, seed=4242))
    by_form = matches_of(client.post("/search?k=4", data={"file": (io.BytesIO(blue), "q.png")},
                                     content_type="multipart/form-data"))
    assert colours(by_form) == ["blue"] * 4
    by_body = matches_of(client.post("/search", data=blue, content_type="image/png",
                                     query_string={"k": 4}))
    assert by_body == by_form


def test_answers_never_show_the_servers_folder(client, indexed):
    folder = str(indexed[0])
    for response in (client.get("/search?q=red"), client.get("/search/index"),
                     client.get("/search/thumbnail?path=nope.png"),
                     client.get("/search/thumbnail?path=../secret.png")):
        assert folder.encode() not in response.data and str(indexed[1]).encode() not in response.data
    info = client.get("/search/index").get_json()
    assert info == {"service": "clip", "status": "success",
                    "index": {"images": len(COLOURS) * PER_COLOUR, "dimensions": 64,
                              "model": info["index"]["model"]}}
    assert info["index"]["model"].count("/") == 0


def test_thumbnails_of_indexed_photos(client):
    response = client.get("/search/thumbnail", query_string={"path": "red/0.png"})
    assert response.status_code == 200 and response.mimetype == "image/jpeg"
    assert response.headers["Cache-Control"] == "private, max-age=3600"
    image = Image.open(io.BytesIO(response.data))
    assert image.format == "JPEG" and max(image.size) <= 256
    red, green, blue = image.convert("RGB").resize((1, 1), Image.Resampling.BOX).getpixel((0, 0))
    assert red > green and red > blue  # the red picture, not another


def test_thumbnails_only_for_indexed_paths_beneath_the_folder(client, indexed, tmp_path):
    folder = indexed[0]
    assert_error(client.get("/search/thumbnail", query_string={"path": "../photos.clipindex"}), 404,
                 "not in the photo index")
    assert_error(client.get("/search/thumbnail", query_string={"path": "/etc/passwd"}), 404)
    assert_error(client.get("/search/thumbnail"), 400, "Give path")
    secret = tmp_path / "secret.png"
    draw_picture("red", "circle").save(secret)
    victim = folder / "red" / "5.png"
    saved = victim.read_bytes()
    victim.unlink()
    try:
        assert_error(client.get("/search/thumbnail?path=red/5.png"), 404, "red/5.png is no longer in the "
                     "indexed folder")
        os.symlink(secret, victim)  # a link swapped in after indexing, leading outside the folder
        message = assert_error(client.get("/search/thumbnail?path=red/5.png"), 403,
                               "red/5.png leads outside the indexed folder")
        assert str(folder) not in message
    finally:
        victim.unlink(missing_ok=True)
        victim.write_bytes(saved)


def test_sighup_reloads_a_rewritten_index_and_keeps_the_old_one_when_the_new_is_broken(
        make_app, search_settings, indexed, trained_model_dir, tmp_path, caplog):
    live = tmp_path / "live.clipindex"
    live.write_bytes(indexed[1].read_bytes())
    app = make_app(dataclasses.replace(search_settings, search_index=live))
    client, service = app.test_client(), app.extensions["clip_service"]

    def images_served() -> int:
        response = client.get("/search/index")
        assert response.status_code == 200, response.get_json()
        return response.get_json()["index"]["images"]

    assert images_served() == len(COLOURS) * PER_COLOUR
    smaller = tmp_path / "smaller"
    write_pictures(smaller, ["red", "blue"], 2)
    engine = load_engine(parse_model_spec(f"local-dir:{trained_model_dir}"), "cpu", "fp32")
    rewritten = tmp_path / "rewritten.clipindex"
    indexer.run(IndexOptions(smaller, rewritten), Settings(clip_model=f"local-dir:{trained_model_dir}"),
                lambda: engine)
    os.replace(rewritten, live)  # as the index command writes: a new file renamed into place
    service.reload()
    assert images_served() == 4
    matches = client.get("/search", query_string={"q": "a red circle"}).get_json()["matches"]
    assert [match["path"].split("/")[0] for match in matches] == ["red", "red", "blue", "blue"]
    damaged = tmp_path / "damaged.clipindex"
    damaged.write_bytes(b"not an index")
    os.replace(damaged, live)
    service.reload()
    assert images_served() == 4  # the index loaded before keeps serving
    assert "was not reloaded" in caplog.text


def test_an_index_with_an_infinite_offset_is_damaged_and_costs_search_only(make_app, search_settings,
                                                                         indexed, tmp_path, caplog):
    """`1e999` in a tensor's data_offsets reads as infinity, and int() of it overflows: the worker
    must still start and classify (an OverflowError escaped and failed the whole worker)."""
    data = indexed[1].read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    header["paths"]["data_offsets"] = [0, "INFINITE"]
    text = json.dumps(header).replace('"INFINITE"', "1e999").encode()
    damaged = tmp_path / "damaged.clipindex"
    damaged.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + size:])
    with pytest.raises(PhotoIndexError, match="damaged"):
        read_index(damaged)
    app = make_app(dataclasses.replace(search_settings, search_index=damaged))
    client = app.test_client()
    assert client.get("/health").status_code == 200
    assert_success(client.post("/analyze", data={"file": (io.BytesIO(png(draw_picture("red", "circle"))),
                                                          "x.png")}, content_type="multipart/form-data"))
    assert_error(client.get("/search?q=red"), 503, "Photo search is unavailable")


def test_an_index_gone_bad_before_a_worker_starts_costs_search_only_until_sighup(
        make_app, search_settings, indexed, tmp_path, caplog):
    """The master checks SEARCH_INDEX once; a worker restarting later may find it damaged, or of
    another shape: it classifies as before, /search says why it cannot answer, SIGHUP mends it."""
    live = tmp_path / "live.clipindex"
    live.write_bytes(b"not an index")
    app = make_app(dataclasses.replace(search_settings, search_index=live))
    client, service = app.test_client(), app.extensions["clip_service"]
    assert client.get("/health").status_code == 200
    assert_success(client.post("/analyze", data={"file": (io.BytesIO(png(draw_picture("red", "circle"))),
                                                          "x.png")}, content_type="multipart/form-data"))
    message = assert_error(client.get("/search?q=red"), 503, "Photo search is unavailable",
                           "indexes again and sends SIGHUP")
    assert str(tmp_path) not in message
    assert "Photo search is unavailable until the index is mended" in caplog.text
    foreign = tmp_path / "foreign.clipindex"  # this model's name and weights, vectors of another width
    original = read_index(indexed[1])
    write_index(foreign, original.folder, original.model, original.model_identity, list(original.paths),
                np.zeros((len(original.paths), 7), dtype=np.float32))
    os.replace(foreign, live)
    service.reload()
    assert_error(client.get("/search?q=red"), 503, "Photo search is unavailable")
    assert "holds 7-dimensional vectors" in caplog.text
    live.write_bytes(indexed[1].read_bytes())
    service.reload()
    found = matches_of(client.get("/search", query_string={"q": "a red circle", "k": 3}))
    assert colours(found) == ["red"] * 3


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_an_unreadable_entry_names_only_the_clients_path_however_long_the_folder(tmp_path, kind):
    """The server's folder may be longer than error messages quote (they shorten paths): still hidden."""
    folder = tmp_path / ("a-long-folder-name-" * 8) / "photos"
    folder.mkdir(parents=True)
    entry = folder / "0.png"
    entry.mkdir() if kind == "folder" else os.mkfifo(entry)
    with pytest.raises(ServiceError) as caught:
        thumbnail_jpeg(folder, "0.png", ImageLimits(1_000_000, 1_000_000))
    assert caught.value.message == "0.png cannot be read as an image file"


def test_a_thumbnail_keeps_to_its_deadline_and_the_decode_budget(tmp_path):
    """REQUEST_TIMEOUT was checked only when the request arrived: a thumbnail decoded however late."""
    folder = tmp_path / "photos"
    folder.mkdir()
    draw_picture("red", "circle", 600, seed=3).save(folder / "big.png")
    limits = ImageLimits(8 << 20, 60_000_000, DecodeBudget(4 * MB))
    with pytest.raises(DeadlineExceeded, match="REQUEST_TIMEOUT"):
        thumbnail_jpeg(folder, "big.png", limits, deadline=time.monotonic() - 0.01)
    with limits.budget.reserved(3 * MB), pytest.raises(Overloaded, match="DECODE_MEMORY_MB"):
        thumbnail_jpeg(folder, "big.png", limits, deadline=time.monotonic() + 0.2)
    thumbnail = Image.open(io.BytesIO(thumbnail_jpeg(folder, "big.png", limits, side=128)))
    assert thumbnail.size == (128, 128) and limits.budget.used == 0


@pytest.mark.parametrize("query, fragment", [
    ({}, "Give q"),
    ({"q": "   "}, "Give q"),
    ({"q": "x" * 301}, "the limit is 300"),
    ({"q": "red", "k": "0"}, "k="),
    ({"q": "red", "k": "101"}, "k="),
    ({"q": ["red", "blue"]}, "Give q only once"),
])
def test_bad_searches_are_400(client, query, fragment):
    assert_error(client.get("/search", query_string=query), 400, fragment)


def test_bad_posts_are_400(client):
    assert_error(client.post("/search?q=red", data=b"x", content_type="image/png"), 400, "not both")
    assert_error(client.post("/search", data=b"not an image", content_type="image/png"), 400, "Not an image")
    assert_error(client.post("/search", data={"other": "x"}, content_type="multipart/form-data"), 400,
                 "no field named file")


def test_search_off_is_404_naming_the_setting(make_app, settings):
    client = make_app(settings).test_client()
    for response in (client.get("/search?q=red"), client.get("/search/index"),
                     client.get("/search/thumbnail?path=a.png"),
                     client.post("/search", data=b"x", content_type="image/png")):
        assert_error(response, 404, "Photo search is off", "SEARCH_INDEX")


def test_an_index_of_another_model_is_named_in_the_log_and_search_is_unavailable(make_app, settings,
                                                                                indexed, caplog):
    """Start-up refuses it (test_startup.py); a worker that meets one later classifies without search."""
    client = make_app(dataclasses.replace(settings, search_index=indexed[1])).test_client()  # the tiny model
    assert client.get("/health").status_code == 200
    assert_error(client.get("/search?q=red"), 503, "Photo search is unavailable")
    assert "was indexed with CLIP_MODEL=" in caplog.text


def test_thumbnails_need_the_key_like_every_route(make_app, search_settings):
    client = make_app(dataclasses.replace(search_settings, api_key="k3y")).test_client()
    assert_error(client.get("/search/thumbnail?path=red/0.png"), 401)
    answer = client.get("/search/thumbnail?path=red/0.png", headers={"Authorization": "Bearer k3y"})
    assert answer.status_code == 200
    foreign = {"Authorization": "Bearer k3y", "Sec-Fetch-Site": "cross-site"}  # another site's <img>
    assert client.get("/search/thumbnail?path=red/0.png", headers=foreign).status_code == 403


def test_file_names_that_are_not_utf8_or_hold_line_separators_are_searched_and_shown(
        make_app, settings, trained_model_dir, tmp_path):
    """A Latin-1 name (copied from an old share) and names holding U+2028 or U+0085: the index is
    made (its journal is read back line by line), /search shows each name as UTF-8 can carry it, and
    a thumbnail is had for exactly what was shown."""
    folder = tmp_path / "odd"
    write_pictures(folder, ["green", "blue"], 2)
    names = [b"caf\xe9.png", "holiday\u2028beach.png".encode(), "x\u0085y.png".encode()]
    for seed, name in enumerate(names):
        draw_picture("red", "circle", 96, seed=500 + seed).save(os.path.join(os.fsencode(folder), name),
                                                                  "PNG")
    engine = load_engine(parse_model_spec(f"local-dir:{trained_model_dir}"), "cpu", "fp32")
    index_file = tmp_path / "odd.clipindex"
    model = f"local-dir:{trained_model_dir}"
    summary = indexer.run(IndexOptions(folder, index_file), Settings(clip_model=model), lambda: engine)
    assert (summary.processed, summary.exit_code) == (7, 0) and index_file.exists()
    client = make_app(dataclasses.replace(settings, clip_model=model, search_index=index_file)).test_client()
    response = client.get("/search", query_string={"q": "a red circle", "k": 3})
    assert response.status_code == 200, response.data[:300]
    shown = sorted(match["path"] for match in response.get_json()["matches"])
    assert shown == ["caf\\xe9.png", "holiday\u2028beach.png", "x\u0085y.png"]
    for path in shown:
        thumbnail = client.get("/search/thumbnail", query_string={"path": path})
        assert thumbnail.status_code == 200 and thumbnail.mimetype == "image/jpeg", path


def test_the_search_commands_lines_cannot_be_forged_by_file_names(trained_model_dir, tmp_path, clean_env,
                                                                  capsysbinary):
    """A photo named x<newline>0.9999<tab>/home/victim/keep.png printed a line of its own for a path
    outside the folder, with the top score, into `cut -f2 | xargs`; its name is escaped now, and -0
    gives every name exactly, NUL-terminated."""
    folder = tmp_path / "photos"
    write_pictures(folder, ["red"], 2)
    forged = folder / "x\n0.9999\t" / "home" / "victim" / "keep.png"
    forged.parent.mkdir(parents=True)
    draw_picture("red", "circle", 96, seed=5).save(forged, "PNG")
    engine = load_engine(parse_model_spec(f"local-dir:{trained_model_dir}"), "cpu", "fp32")
    output = tmp_path / "photos.clipindex"
    indexer.run(IndexOptions(folder, output), Settings(clip_model=f"local-dir:{trained_model_dir}"),
                lambda: engine)
    for name, value in (("CLIP_MODEL", f"local-dir:{trained_model_dir}"), ("CLIP_DEVICE", "cpu"),
                        ("CLIP_BACKEND", "torch"), ("CLIP_CACHE_DIR", str(tmp_path / "cache"))):
        clean_env.setenv(name, value)
    assert cli.main(["search", str(output), "a red circle", "-k", "3"]) == 0
    lines = capsysbinary.readouterr().out.decode().splitlines()
    assert len(lines) == 3, lines
    paths = [line.split("\t")[1] for line in lines]  # two fields a line, never three
    assert all(path.startswith(f"{folder.resolve()}/") for path in paths), lines
    assert f"{folder.resolve()}/x\\x0a0.9999\\x09/home/victim/keep.png" in paths
    assert cli.main(["search", str(output), "a red circle", "-k", "3", "-0"]) == 0
    records = capsysbinary.readouterr().out.split(b"\0")
    assert records[-1] == b"" and len(records) == 4
    assert str(forged.resolve()).encode() in [record.split(b"\t", 1)[1] for record in records[:-1]]
