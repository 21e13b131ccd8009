"""The decode-memory budget (inputs/budget.py, DECODE_MEMORY_MB): each decode's peak estimated from the
header and reserved until the image is the model's input; waits bounded by the deadline; an image over
the whole budget refused with 413; the same budget for /analyze, /analyze/batch, /embed, tag and index.
CLIP.sh under sixteen 16-bit bombs: tests/test_costly_requests.py (inputs/budget.py)."""

from __future__ import annotations

import dataclasses
import io
import logging
import threading
import time

import numpy as np
import pytest
from PIL import Image

from clip_service.errors import DeadlineExceeded, Overloaded, TooLarge
from clip_service.inputs.budget import MB, DecodeBudget
from clip_service.inputs.images import HIGH_DEPTH_STRIPS, ImageLimits, decode_image, decode_peak_bytes
from clip_service.library import indexer, tagger
from clip_service.library.indexer import IndexOptions
from clip_service.library.tagger import TagOptions, build_classifier
from clip_service.settings import SettingsError, load_settings
from tests.support.images import encode, image_bytes
from tests.support.responses import assert_error

SIXTEEN_BIT = encode(np.full((1500, 2000), 40000, dtype=np.uint16), "PNG")  # 3 MP: 24 MB + strips
LIMITS = ImageLimits(8 << 20, 60_000_000)


def opened(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def test_the_peak_is_every_image_the_decode_holds_at_once():
    # 16-bit grey: itself, the copy a turn might make (a PNG's EXIF may follow its pixels), the RGB
    assert decode_peak_bytes(opened(SIXTEEN_BIT)) == 2000 * 1500 * (2 + 2 + 4) + HIGH_DEPTH_STRIPS
    assert decode_peak_bytes(opened(encode(Image.new("RGB", (640, 480)), "JPEG"))) == 640 * 480 * 4
    turned = encode(Image.new("RGB", (640, 480)), "JPEG", exif=b"Exif\x00\x00" + _orientation(6))
    assert decode_peak_bytes(opened(turned)) == 640 * 480 * 8
    assert decode_peak_bytes(opened(encode(Image.new("RGBA", (100, 100)), "WEBP"))) == 100 * 100 * (4 + 5)


def _orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()[6:] if exif.tobytes().startswith(b"Exif") else exif.tobytes()


def test_an_image_over_the_whole_budget_is_413_naming_the_limit():
    limits = dataclasses.replace(LIMITS, budget=DecodeBudget(16 * MB))
    with pytest.raises(TooLarge, match=r"about 47 MB .* limit is 16 MB per worker \(DECODE_MEMORY_MB\)"):
        decode_image(SIXTEEN_BIT, limits)
    assert limits.budget.used == 0


def test_the_reservation_lasts_until_the_image_is_prepared():
    budget = DecodeBudget(64 * MB)
    held = []
    decode_image(SIXTEEN_BIT, dataclasses.replace(LIMITS, budget=budget),
                 prepare=lambda _: held.append(budget.used))
    assert held == [decode_peak_bytes(opened(SIXTEEN_BIT))] and budget.used == 0


def test_a_decode_waits_for_its_share_and_starts_when_it_is_freed():
    budget = DecodeBudget(64 * MB)
    limits = dataclasses.replace(LIMITS, budget=budget)
    release, taken = threading.Event(), threading.Event()

    def hold():
        with budget.reserved(40 * MB):
            taken.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    taken.wait(10)
    threading.Timer(0.5, release.set).start()
    began = time.monotonic()
    image = decode_image(SIXTEEN_BIT, limits, deadline=time.monotonic() + 30)
    holder.join()
    assert image.size == (2000, 1500) and 0.4 <= time.monotonic() - began < 10
    assert budget.used == 0


def test_a_decode_that_could_not_finish_in_time_is_refused_at_once_with_retry_after():
    budget = DecodeBudget(64 * MB)
    limits = dataclasses.replace(LIMITS, budget=budget)
    with budget.reserved(40 * MB):
        began = time.monotonic()
        with pytest.raises(Overloaded, match="DECODE_MEMORY_MB=64") as refused:
            decode_image(SIXTEEN_BIT, limits, deadline=time.monotonic() + 0.3)
        assert time.monotonic() - began < 0.35, "refused by the deadline, never after it"
        assert refused.value.retry_after >= 1
        # a small photo passes the waiting bomb: it fits beside the reservation
        assert decode_image(image_bytes("PNG", (64, 48)), limits).size == (64, 48)


def test_the_setting_is_read_and_checked(tmp_path):
    assert load_settings(tmp_path / "none.env", environ={}).decode_memory_mb == 1024
    assert load_settings(tmp_path / "none.env", environ={"DECODE_MEMORY_MB": "256"}).decode_memory_mb == 256
    with pytest.raises(SettingsError, match="DECODE_MEMORY_MB"):
        load_settings(tmp_path / "none.env", environ={"DECODE_MEMORY_MB": "0"})


@pytest.fixture
def small_budget_client(make_app, settings):
    return make_app(dataclasses.replace(settings, decode_memory_mb=16)).test_client()


@pytest.mark.parametrize("route", ["/analyze", "/analyze/batch", "/embed"])
def test_every_route_answers_413_for_an_image_over_the_budget(small_budget_client, route):
    response = small_budget_client.post(route, data={"file": [(io.BytesIO(SIXTEEN_BIT), "deep.png")]},
                                        content_type="multipart/form-data")
    if route == "/analyze/batch":
        assert response.status_code == 200
        assert "DECODE_MEMORY_MB" in response.get_json()["results"][0]["error"]["message"]
    else:
        assert_error(response, 413, "DECODE_MEMORY_MB")


@pytest.fixture
def real_classifier(settings, tiny_engine):
    return build_classifier(settings, tiny_engine, tagger.cli_emoji(settings))


def test_tag_and_index_skip_an_image_over_the_budget(settings, tmp_path, caplog, real_classifier):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "deep.png").write_bytes(SIXTEEN_BIT)
    (folder / "small.png").write_bytes(image_bytes("PNG", (64, 48)))
    small = dataclasses.replace(settings, decode_memory_mb=16)
    with caplog.at_level(logging.WARNING):
        tagged = tagger.run(TagOptions(folder, tmp_path / "tags.jsonl"), small, lambda: real_classifier)
        indexed = indexer.run(IndexOptions(folder, tmp_path / "photos.clipindex"), small,
                              lambda: real_classifier.engine)
    assert (tagged.processed, tagged.skipped) == (1, 1) and (indexed.processed, indexed.skipped) == (1, 1)
    assert caplog.text.count("DECODE_MEMORY_MB") == 2


def test_a_decode_is_cut_at_its_deadline_not_after_the_whole_image():
    """A decode that got its memory near its deadline still ends by it: Pillow reads the bytes in
    small blocks, and none is read after the deadline (a 60-megapixel PNG inflates from two reads)."""
    bomb = encode(np.zeros((7745, 7745), dtype=np.uint16), "PNG")
    began = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="REQUEST_TIMEOUT"):
        decode_image(bomb, LIMITS, deadline=time.monotonic() + 0.1)
    assert time.monotonic() - began < 0.5
