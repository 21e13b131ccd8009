import json
import time

import pytest

from clip_service.vocabulary.emoji import EmojiMapper, concept_key, parse_mappings
from tests.support.http_fixtures import LocalServer, free_port
from tests.support.waiting import wait_for


def test_concept_key():
    assert concept_key("Golden  Retriever") == "golden_retriever"
    assert concept_key("cat") == "cat"


@pytest.mark.parametrize("payload", [[], "🐱", {"cat": 3}, {"cat": ""}, None])
def test_wrong_shapes_are_refused(payload):
    with pytest.raises(ValueError):
        parse_mappings(payload)


def test_api_entries_win_over_local_ones_and_missing_gives_none(local_server):
    local_server.routes["/emoji_mappings.json"] = (
        200, {"Content-Type": "application/json"}, json.dumps({"cat": "😺", "Hot_Dog": "🌭"}).encode())
    mapper = EmojiMapper({"cat": "🐱", "dog": "🐕"}, local_server.url("/emoji_mappings.json"), 2.0)
    mapper.start()
    try:
        assert mapper.api_reachable
        assert mapper.emoji_for("cat") == "😺"
        assert mapper.emoji_for("Dog") == "🐕"
        assert mapper.emoji_for("hot dog") == "🌭"
        assert mapper.emoji_for("unicorn") is None
    finally:
        mapper.stop()


def test_api_down_at_start_up_then_up_later():
    port = free_port()
    mapper = EmojiMapper({"cat": "🐱"}, f"http://127.0.0.1:{port}/emoji_mappings.json", 0.3,
                         retry_seconds=0.1)
    started = time.monotonic()
    mapper.start()
    assert time.monotonic() - started < 1.0
    assert not mapper.api_reachable
    assert mapper.emoji_for("cat") == "🐱"
    server = LocalServer(port)
    server.routes["/emoji_mappings.json"] = (200, {}, json.dumps({"cat": "😺"}).encode())
    try:
        assert wait_for(lambda: mapper.api_reachable)
        assert mapper.emoji_for("cat") == "😺"
    finally:
        mapper.stop()
        server.close()


@pytest.mark.parametrize("status, body", [(200, b"<html>not json</html>"), (200, b"[1, 2]"),
                                          (500, b"{}"), (200, b'{"cat": 7}')])
def test_broken_answers_count_as_down_and_recover(local_server, status, body):
    local_server.routes["/emoji_mappings.json"] = (status, {}, body)
    mapper = EmojiMapper({"cat": "🐱"}, local_server.url("/emoji_mappings.json"), 0.5,
                         retry_seconds=0.1)
    mapper.start()
    try:
        assert not mapper.api_reachable
        assert mapper.emoji_for("cat") == "🐱"
        local_server.routes["/emoji_mappings.json"] = (200, {}, b'{"cat": "\\ud83d\\ude3a"}')
        assert wait_for(lambda: mapper.api_reachable)
        assert mapper.emoji_for("cat") == "😺"
    finally:
        mapper.stop()


def test_a_redirecting_api_is_down_and_its_target_never_asked(local_server):
    """The API may reach any address, so it may send the service nowhere else."""
    local_server.routes["/emoji_mappings.json"] = (302, {"Location": local_server.url("/elsewhere")}, b"")
    local_server.routes["/elsewhere"] = (200, {}, json.dumps({"cat": "😺"}).encode())
    mapper = EmojiMapper({"cat": "🐱"}, local_server.url("/emoji_mappings.json"), 2.0, retry_seconds=60)
    mapper.start()
    try:
        assert not mapper.api_reachable
        assert mapper.emoji_for("cat") == "🐱"
        assert local_server.hits == ["/emoji_mappings.json"]
    finally:
        mapper.stop()
