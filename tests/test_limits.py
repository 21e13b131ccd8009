"""http/limits.py: one place for the body limits that Flask and the front door both apply."""

from __future__ import annotations

import dataclasses
import json

from clip_service.http.front_door import parse_head
from clip_service.http.limits import JSON_BODY_MAX, MULTIPART_OVERHEAD, body_limits
from clip_service.http.options import MAX_LABEL_CHARACTERS, MAX_REQUEST_LABELS
from clip_service.settings import Settings


def test_limits_by_route_and_body_kind():
    limits = body_limits(dataclasses.replace(Settings(), max_image_bytes=1_000_000, batch_files_max=4))
    assert limits.one_image == 1_000_000 + MULTIPART_OVERHEAD
    assert limits.many_images == 4_000_000 + MULTIPART_OVERHEAD
    for path in ("/analyze/batch", "/embed"):
        assert limits.for_request(path, "multipart/form-data") == limits.many_images
        assert limits.for_request(path, "image/jpeg") == limits.one_image  # a raw body
    for path in ("/analyze", "/v3/analyze", "/search", "/analyze/batch/", "/embedx"):
        assert limits.for_request(path, "multipart/form-data") == limits.one_image
    for path in ("/embed", "/analyze"):  # a JSON body is never an image: /embed's texts at most
        assert limits.for_request(path, "application/json") == JSON_BODY_MAX < limits.one_image
        assert "100 texts" in limits.described(path, "application/json")
    assert "BATCH_FILES_MAX" in limits.described("/embed", "multipart/form-data")


def test_the_json_limit_holds_the_largest_valid_texts_request():
    """100 texts of 64 characters, each character escaped as a surrogate pair: the worst valid body."""
    body = json.dumps({"texts": ["\U0001F600" * MAX_LABEL_CHARACTERS] * MAX_REQUEST_LABELS, "prompts": True,
                       "encoding": "base64"}, ensure_ascii=True)
    assert len(body) <= JSON_BODY_MAX


def test_the_door_reads_the_body_kind_from_the_head():
    head = parse_head(b"POST /embed HTTP/1.1\r\nHost: h\r\nContent-Type: Multipart/Form-Data; boundary=x\r\n"
                      b"Content-Length: 9\r\n\r\n")
    assert head.media_type == "multipart/form-data" and head.content_length == 9
    json_head = parse_head(b"POST /embed HTTP/1.1\r\nHost: h\r\n"
                           b"Content-Type: Application/JSON; charset=utf-8\r\n\r\n")
    assert json_head.media_type == "application/json"
    assert parse_head(b"GET /embed HTTP/1.1\r\nHost: h\r\n\r\n").media_type == ""
