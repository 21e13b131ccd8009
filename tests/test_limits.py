"""http/limits.py: one place for the body limits that Flask and the front door both apply."""

from __future__ import annotations

import dataclasses

from clip_service.http.front_door import parse_head
from clip_service.http.limits import MULTIPART_OVERHEAD, body_limits
from clip_service.settings import Settings


def test_limits_by_route_and_body_kind():
    limits = body_limits(dataclasses.replace(Settings(), max_image_bytes=1_000_000, batch_files_max=4))
    assert limits.one_image == 1_000_000 + MULTIPART_OVERHEAD
    assert limits.many_images == 4_000_000 + MULTIPART_OVERHEAD
    for path in ("/analyze/batch", "/embed"):
        assert limits.for_request(path, multipart=True) == limits.many_images
        assert limits.for_request(path, multipart=False) == limits.one_image  # a JSON or raw body
    for path in ("/analyze", "/v3/analyze", "/search", "/analyze/batch/", "/embedx"):
        assert limits.for_request(path, multipart=True) == limits.one_image


def test_the_door_reads_the_body_kind_from_the_head():
    head = parse_head(b"POST /embed HTTP/1.1\r\nContent-Type: Multipart/Form-Data; boundary=x\r\n"
                      b"Content-Length: 9\r\n\r\n")
    assert head.multipart and head.content_length == 9
    assert not parse_head(b"POST /embed HTTP/1.1\r\nContent-Type: application/json\r\n\r\n").multipart
    assert not parse_head(b"GET /embed HTTP/1.1\r\n\r\n").multipart
