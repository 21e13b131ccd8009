"""What one client with a laptop can do to CLIP.sh exposed directly (issue 17), tried on CLIP.sh itself.

One server for the module, with CLIP.sh's defaults (one worker, its threads and MAX_QUEUE), the tiny
model and REQUEST_TIMEOUT=5. Each attack holds its hostile connections open while a bystander checks
that /health answers within 1 s and an upload within 3 s, as the animal-farm orchestrator needs (it
stops a CLIP worker whose /health misses its 2 s timeout).
"""

from __future__ import annotations

import contextlib
import copy
import json
import socket
import time
from pathlib import Path

import jsonschema
import pytest
import requests

from clip_service.http.openapi import openapi_description
from tests.support.http_fixtures import free_port
from tests.support.images import image_bytes
from tests.support.nginx import nginx_config, require_nginx, start_nginx, stop_nginx, wait_listening
from tests.support.server import CLIP_SH, ClipServer, clip_sh_env, worker_pids

pytestmark = pytest.mark.system

REQUEST_TIMEOUT = 5
# The Error shape every error answer has, as the API description states it.
ERROR_SCHEMA = {**openapi_description()["components"]["schemas"]["Error"],
                "components": openapi_description()["components"]}
HEALTH_WITHIN = 1.0
UPLOAD_WITHIN = 3.0
# Finding 2: 100 requests with large answers, pipelined by a client that never reads them.
NOT_READ = b"GET /openapi.json HTTP/1.1\r\nHost: localhost\r\n\r\n" * 100
# Finding 1: a blank line before the request line, a body announced and never sent.
BLANK_LINE_FIRST = (b"\r\nPOST /analyze HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                    b"Content-Length: 1000\r\n\r\n")


def env_for(labels_dir, emoji_file, model_dir, folder: Path, **settings) -> dict[str, str]:
    return clip_sh_env(f"local-dir:{model_dir}", labels_dir, emoji_file, folder / "cache", api_port=9,
                       api_timeout=0.2, REQUEST_TIMEOUT=REQUEST_TIMEOUT, **settings)


@pytest.fixture(scope="module")
def laptop_server(labels_dir, emoji_file, tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("one-laptop")
    server = ClipServer(env_for(labels_dir, emoji_file, tiny_model_dir, folder), folder / "server.log")
    yield server
    assert server.stop() == 0


def bystander(server: ClipServer, seconds: float = 2.0) -> tuple[float, float]:
    """Poll /health and upload for `seconds`: (slowest /health, slowest upload); every answer a 200."""
    data = image_bytes("PNG", (64, 64), (200, 30, 30))
    health, upload = 0.0, 0.0
    ends = time.monotonic() + seconds
    while time.monotonic() < ends:
        began = time.monotonic()
        assert requests.get(f"{server.base}/health", timeout=10).status_code == 200
        health = max(health, time.monotonic() - began)
        began = time.monotonic()
        assert server.upload(data, timeout=10).status_code == 200
        upload = max(upload, time.monotonic() - began)
    return health, upload


def held(port: int, raw: bytes, count: int = 2, receive_buffer: int | None = None) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        sock = socket.socket()
        if receive_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.connect(("127.0.0.1", port))
        sock.sendall(raw)
        socks.append(sock)
    return socks


def answer_of(sock: socket.socket, timeout: float = 3.0) -> bytes:
    """What the server sent until it closed (or `timeout` passed)."""
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(OSError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def assert_json_error(answer: bytes, status: int) -> dict:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), answer[:200]
    assert b"X-Content-Type-Options: nosniff" in head and b"Content-Type: application/json" in head
    document = json.loads(body)
    jsonschema.validate(document, ERROR_SCHEMA)
    assert document["error"]["message"]
    return document


@pytest.mark.parametrize("raw", [
    BLANK_LINE_FIRST,
    b"\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n",
])
def test_a_head_the_door_cannot_parse_is_its_own_400_and_takes_no_thread(laptop_server, raw):
    socks = held(laptop_server.port, raw)
    try:
        health, upload = bystander(laptop_server)
        for sock in socks:
            assert_json_error(answer_of(sock), 400)
    finally:
        for sock in socks:
            sock.close()
    print(f"\nheld unparseable heads: /health slowest {health:.3f} s, upload slowest {upload:.3f} s")
    assert health < HEALTH_WITHIN and upload < UPLOAD_WITHIN


@pytest.mark.parametrize("raw", [
    # finding 5: a chunked body to a light path, never sent
    b"POST /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"OPTIONS /analyze HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
    # a Content-Length body to a light path, never sent: it would wait in the MAX_QUEUE lane's reading
    b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n",
])
def test_a_body_on_a_light_path_never_holds_a_light_thread(laptop_server, raw):
    socks = held(laptop_server.port, raw)
    try:
        health, upload = bystander(laptop_server)
        if b"chunked" in raw:
            for sock in socks:
                assert_json_error(answer_of(sock), 411)
    finally:
        for sock in socks:
            sock.close()
    print(f"\nheld bodies to light paths: /health slowest {health:.3f} s, upload slowest {upload:.3f} s")
    assert health < HEALTH_WITHIN and upload < UPLOAD_WITHIN


def test_clients_that_never_read_their_answers_hold_no_thread_and_are_dropped(laptop_server):
    """Finding 2: two sockets with a 4 KiB receive buffer pipeline 100 requests each, never reading;
    their answers (the API description, 52 KB each) overflow every buffer between."""
    pipelined = NOT_READ
    socks = held(laptop_server.port, pipelined, receive_buffer=4096)
    began = time.monotonic()
    try:
        health, upload = bystander(laptop_server, seconds=3.0)
        # past REQUEST_TIMEOUT with its answer unread, a client is dropped
        time.sleep(max(0.0, began + REQUEST_TIMEOUT + 1.5 - time.monotonic()))
        for sock in socks:
            sock.settimeout(5)
            with pytest.raises((ConnectionResetError, BrokenPipeError, TimeoutError, OSError)):
                while sock.recv(1 << 20):
                    pass
                raise ConnectionResetError("closed")  # an orderly close counts as dropped too
    finally:
        for sock in socks:
            sock.close()
    print(f"\nclients not reading: /health slowest {health:.3f} s, upload slowest {upload:.3f} s")
    assert health < HEALTH_WITHIN and upload < UPLOAD_WITHIN


def test_a_64_mib_body_is_answered_within_the_deadline(laptop_server):
    """Finding 3: reading a large multipart body costs time linear in its size."""
    size = 64 * 1024 * 1024
    body = (b"--b\r\nContent-Disposition: form-data; name=file; filename=a.png\r\nContent-Type: image/png"
            b"\r\n\r\n" + b"\0" * size + b"\r\n--b--\r\n")
    began = time.monotonic()
    answer = requests.post(f"{laptop_server.base}/embed", data=body, timeout=30,
                           headers={"Content-Type": "multipart/form-data; boundary=b"})
    seconds = time.monotonic() - began
    print(f"\n64 MiB multipart body to /embed: {answer.status_code} after {seconds:.2f} s")
    assert answer.json()["status"] == "error" and answer.status_code in (400, 413, 504)
    assert seconds < REQUEST_TIMEOUT + 1


def test_expect_100_continue_only_for_http_1_1_and_once(laptop_server):
    """Finding 6: HTTP/1.0 gets no 100 Continue; two Expect lines get one."""
    body = b"x" * 10
    for version, expect_lines, continues in ((b"1.0", 1, 0), (b"1.1", 2, 1)):
        raw = (b"POST /analyze HTTP/" + version + b"\r\nHost: x\r\nContent-Type: image/png\r\n"
               + b"Expect: 100-continue\r\n" * expect_lines
               + b"Content-Length: 10\r\nConnection: close\r\n\r\n")
        with socket.create_connection(("127.0.0.1", laptop_server.port)) as sock:
            sock.sendall(raw)
            time.sleep(0.3)
            sock.sendall(body)
            answer = answer_of(sock)
        assert answer.count(b"100 Continue") == continues, answer[:300]
        final = answer.replace(b"HTTP/1.1 100 Continue\r\n\r\n", b"")
        assert final.split(b" ")[1] == b"400", final[:300]  # not an image
        assert json.loads(final.partition(b"\r\n\r\n")[2])["status"] == "error"


@pytest.mark.parametrize(("raw", "status"), [
    (b"GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n", 400),  # a control byte in the target
    (b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n", 400),  # not UTF-8, not even ASCII
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX: a\r\n folded\r\n\r\n", 400),  # obs-fold
    (b"GET /health HTTP/1.1\nHost: x\n\n", 400),  # bare LF
    (b"GET /health\r\n\r\n", 400),  # HTTP/0.9
    (b"GET /health HTTP/1.1\r\n\r\n", 400),  # no Host
    (b"POST /analyze HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
    (b"POST /analyze HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\n", 400),
    (b"POST /analyze HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST /analyze HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n", 501),
    (b"POST /analyze HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked \r\n\r\n", 411),
    (b"get /health HTTP/1.1\r\nHost: x\r\n\r\n", 400),  # gunicorn would refuse it
    (b"GET /analyze?labels=" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 9_000 + b"\r\n\r\n", 431),
    (b"POST /analyze HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n", 413),
])
def test_every_refusal_has_the_error_shape_and_nosniff(laptop_server, raw, status):
    with socket.create_connection(("127.0.0.1", laptop_server.port)) as sock:
        sock.sendall(raw)
        assert_json_error(answer_of(sock), status)


def test_out_of_descriptors_the_worker_lives_and_health_answers(labels_dir, emoji_file, tiny_model_dir,
                                                                 tmp_path):
    """Finding 4, under `ulimit -n 256`: idle connections past the cap, and refused ones lingering."""
    env = env_for(labels_dir, emoji_file, tiny_model_dir, tmp_path)
    server = ClipServer(env, tmp_path / "server.log", ("bash", "-c", f'ulimit -n 256 && exec "{CLIP_SH}"'))
    socks = []
    try:
        workers = worker_pids(server.process.pid)
        for _ in range(300):
            with contextlib.suppress(OSError):
                socks.append(socket.create_connection(("127.0.0.1", server.port), timeout=2))
        too_large = b"POST /analyze HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n"
        socks += held(server.port, too_large, count=40)
        health, upload = bystander(server, seconds=2.0)
        assert worker_pids(server.process.pid) == workers, "the worker is the same process"
    finally:
        for sock in socks:
            sock.close()
        status = server.stop()
    log = server.log.read_text()
    print(f"\n340 connections under ulimit -n 256: /health slowest {health:.3f} s, upload slowest "
          f"{upload:.3f} s")
    assert "Errno 24" not in log and log.count("Booting worker") == 1 and status == 0
    assert health < HEALTH_WITHIN and upload < UPLOAD_WITHIN


def test_many_cheap_requests_do_not_delay_the_probe(laptop_server):
    """Finding 6: 150 connections each asking for /labels at once; /health has a thread of its own."""
    socks = held(laptop_server.port, b"GET /labels HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
                 count=150)
    try:
        slowest = 0.0
        for _ in range(5):
            began = time.monotonic()
            assert requests.get(f"{laptop_server.base}/health", timeout=10).status_code == 200
            slowest = max(slowest, time.monotonic() - began)
        answered = sum(answer_of(sock, 10).startswith(b"HTTP/1.1 200 ") for sock in socks[:5])
    finally:
        for sock in socks:
            sock.close()
    print(f"\n150 concurrent /labels: /health slowest {slowest:.3f} s")
    assert answered == 5
    assert slowest < HEALTH_WITHIN


@pytest.fixture(scope="module")
def through_nginx(laptop_server, tmp_path_factory):
    """services/nginx-clip.conf in front of the module's CLIP.sh: a ClipServer-like view of it."""
    require_nginx()
    port = free_port()
    upstreams = [laptop_server.port] * 2  # the shipped config names two instances
    nginx = start_nginx(nginx_config(tmp_path_factory.mktemp("nginx"), port, upstreams))
    view = copy.copy(laptop_server)
    view.port, view.base = port, f"http://127.0.0.1:{port}"
    try:
        wait_listening(view.base, nginx)
        yield view
    finally:
        stop_nginx(nginx)


@pytest.mark.parametrize(("raw", "receive_buffer"), [
    (BLANK_LINE_FIRST, None),
    (b"POST /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", None),
    (NOT_READ, 4096),
], ids=["blank line first", "chunked to a light path", "not reading"])
def test_the_same_attacks_through_nginx(through_nginx, raw, receive_buffer):
    socks = held(through_nginx.port, raw, receive_buffer=receive_buffer)
    try:
        health, upload = bystander(through_nginx)
    finally:
        for sock in socks:
            sock.close()
    print(f"\nthrough nginx: /health slowest {health:.3f} s, upload slowest {upload:.3f} s")
    assert health < HEALTH_WITHIN and upload < UPLOAD_WITHIN
