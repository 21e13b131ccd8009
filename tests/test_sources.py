"""inputs/sources.py: upload, file= and url= each give bytes that the one decode step makes the same RGB
image, at the loaded model's draft size, within the settings' limits, and no decoding starts once the
request's time is up."""

from __future__ import annotations

import dataclasses
import time

import pytest

from clip_service.errors import DeadlineExceeded, Forbidden, TooLarge
from clip_service.inputs.sources import ImageSources
from tests.support.images import encode, image_bytes, quadrants

JPEG = encode(quadrants(1600, 1200), "JPEG", quality=90)


@pytest.fixture
def sources(settings):
    return ImageSources(dataclasses.replace(settings, url_allowlist=("127.0.0.1",)))


def test_the_three_sources_give_the_same_image(sources, settings, local_server):
    data = image_bytes("PNG", (60, 40), (10, 120, 240))
    path = settings.allowed_file_roots[0] / "same.png"
    path.write_bytes(data)
    local_server.routes["/same.png"] = (200, {"Content-Type": "image/png"}, data)
    images = sources.prepare_all([data, sources.file_bytes(str(path)),
                                  sources.url_bytes(local_server.url("/same.png"))])
    assert {image.mode for image in images} == {"RGB"}
    assert images[0].tobytes() == images[1].tobytes() == images[2].tobytes()
    assert images[0].size == (60, 40)


def test_a_jpeg_is_drafted_only_once_a_model_input_size_is_known(settings):
    before = ImageSources(settings)
    assert before.prepare_all([JPEG])[0].size == (1600, 1200)
    drafted = ImageSources(settings, lambda: (64, 64))
    assert drafted.prepare_all([JPEG])[0].size == (200, 150)  # 1/8: still at least twice 64 on each side


def test_limits_and_file_roots_come_from_the_settings(settings, tmp_path_factory):
    small = ImageSources(dataclasses.replace(settings, max_image_bytes=1024))
    with pytest.raises(TooLarge, match="MAX_IMAGE_BYTES"):
        small.prepare_all([JPEG])
    outside = tmp_path_factory.mktemp("outside") / "photo.jpg"
    outside.write_bytes(JPEG)
    with pytest.raises(Forbidden, match="ALLOWED_FILE_ROOTS"):
        ImageSources(settings).file_bytes(str(outside))


def test_no_decoding_starts_after_the_deadline(sources, local_server):
    local_server.routes["/late.jpg"] = (200, {}, JPEG)
    past = time.monotonic() - 0.1
    with pytest.raises(DeadlineExceeded, match="before its image could be decoded"):
        sources.prepare_all([JPEG], past)
    with pytest.raises(DeadlineExceeded):
        sources.url_bytes(local_server.url("/late.jpg"), past)
