"""The front door under gunicorn: overload, slow clients and odd framing, against CLIP.sh itself.

The model is a real open_clip model whose image tower is slow on a CPU (256-pixel input, 8-pixel
patches: 1,024 tokens) but whose weights are small, so requests really queue up.
"""

from __future__ import annotations

import collections
import copy
import errno
import gc
import logging
import os
import select
import selectors
import socket
import threading
import time
from concurrent import futures

import pytest
import requests
from gunicorn.config import Config

from clip_service.http.front_door import DoorConnection, FrontDoorWorker, parse_head
from tests.support.http_fixtures import free_port
from tests.support.images import image_bytes
from tests.support.models import TINY_CONFIG, write_tiny_clip
from tests.support.nginx import nginx_config, require_nginx, start_nginx, stop_nginx, wait_listening
from tests.support.server import start, stop, wait_healthy

SLOW_CONFIG = copy.deepcopy(TINY_CONFIG)
SLOW_CONFIG["vision_cfg"].update(image_size=256, patch_size=8, width=64, head_width=32, layers=2)


@pytest.fixture(scope="session")
def slow_model_dir(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("slow-clip"), model_cfg=SLOW_CONFIG)


@pytest.fixture
def door_server(server_env, slow_model_dir, tmp_path):
    """CLIP.sh with its defaults (no THREADS, no MAX_QUEUE), the slow model, and a short deadline."""
    env = {key: value for key, value in server_env.items() if key not in ("THREADS", "WORKERS")}
    env.update(CLIP_MODEL=f"local-dir:{slow_model_dir}", REQUEST_TIMEOUT="3")
    process = start(env, tmp_path / "door.log")
    port = int(env["PORT"])
    try:
        wait_healthy(port, process, log_path=tmp_path / "door.log")
        yield f"http://127.0.0.1:{port}", port
    finally:
        stop(process)


@pytest.mark.parametrize(("raw", "expected"), [
    (b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n", ("GET", "/health", 0, False, False)),
    (b"POST /analyze?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 12\r\n\r\nbody",
     ("POST", "/analyze", 12, False, False)),
    (b"POST http://h/analyze HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n",
     ("POST", "/analyze", 0, True, False)),
    (b"POST /analyze HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
     ("POST", "/analyze", 3, False, True)),
    (b"POST /analyze HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
     ("POST", "/analyze", 3, False, False)),  # no 100 Continue for HTTP/1.0
    (b"GET /heal%74h HTTP/1.1\r\nHost: h\r\n\r\n", ("GET", "/health", 0, False, False)),  # as PATH_INFO
])
def test_parse_head_reads_what_routing_and_sizing_need(raw, expected):
    head = parse_head(raw)
    assert (head.method, head.path, head.content_length, head.chunked, head.expects_continue) == expected


@pytest.mark.parametrize("raw", [
    b"GET /health\r\n\r\n",
    b"\r\nGET /health HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: h\r\nno colon here\r\n\r\n",
    b"POST /analyze HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    b"POST /analyze HTTP/1.1\r\nHost: h\r\nContent-Length: -5\r\n\r\n",
    b"POST /analyze HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET /health HTTP/2.0\r\nHost: h\r\n\r\n",
])
def test_parse_head_refuses_malformed_heads(raw):
    with pytest.raises(ValueError):
        parse_head(raw)


def upload_body(data: bytes) -> tuple[bytes, str]:
    body = (b"--b\r\nContent-Disposition: form-data; name=file; filename=a.jpg\r\n"
            b"Content-Type: image/jpeg\r\n\r\n" + data + b"\r\n--b--\r\n")
    return body, "multipart/form-data; boundary=b"


def read_answer(sock: socket.socket, timeout: float = 10) -> bytes:
    sock.settimeout(timeout)
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer


class DoorUnderTest:
    """The door's event-loop side, driven by hand on socket pairs: no gunicorn, no app. Requests it
    hands on wait in `handle` until `release` is set."""

    def __init__(self, max_queue: int, request_timeout: float = 30.0):
        worker = FrontDoorWorker(0, os.getpid(), [], None, 30, Config(), logging.getLogger("door-test"))
        worker.max_queue, worker.request_timeout = max_queue, request_timeout
        worker.tpool = futures.ThreadPoolExecutor(max_queue)
        worker.light_pool = futures.ThreadPoolExecutor(1)
        worker.poller = selectors.DefaultSelector()
        worker.method_queue.init()
        self.release = threading.Event()
        worker.handle = lambda conn: (self.release.wait(10) and False, b"", 0)
        self.worker, self.clients = worker, []

    def connect(self) -> socket.socket:
        client, server = socket.socketpair()
        address = ("127.0.0.1", 1)
        conn = DoorConnection(self.worker.cfg, server, address, address)
        self.worker.nr_conns += 1
        self.worker._start_reading(conn, b"")
        self.clients.append(client)
        return client

    def turn(self) -> None:
        """One turn of the event loop: read what arrived, then the deadlines."""
        for key, _ in self.worker.poller.select(0.2):
            key.data(key.fileobj)
        self.worker.murder_pending()

    def close(self) -> None:
        self.release.set()
        self.worker.tpool.shutdown()
        self.worker.light_pool.shutdown()
        for client in self.clients:
            client.close()


def test_the_door_counts_only_the_bytes_of_requests_it_is_still_reading():
    """The door refuses uploads once the bodies it holds would pass its buffer limit, so every byte it
    counts must be uncounted when a request is handed on, refused, cut at its deadline or abandoned."""
    door = DoorUnderTest(max_queue=1, request_timeout=0.5)
    upload = b"POST /analyze HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n" + b"x" * 1000
    try:
        first, second = door.connect(), door.connect()
        first.sendall(upload)
        second.sendall(upload)
        door.turn()
        assert door.worker.heavy_in_flight == 1, "one request handed on, MAX_QUEUE=1"
        assert second.recv(4096).startswith(b"HTTP/1.1 503 "), "the other refused"
        expecting = door.connect()  # the door answers 100 Continue and takes the Expect line out
        expecting.sendall(upload.replace(b"Content-Length", b"Expect: 100-continue\r\nContent-Length"))
        door.turn()
        expecting.settimeout(5)
        answer = expecting.recv(4096)
        while b"503" not in answer:
            answer += expecting.recv(4096)
        assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 ")
        assert door.worker.buffered == 0, "the Expect line's bytes were uncounted too"
        abandoned, late = door.connect(), door.connect()
        abandoned.sendall(upload[:500])
        late.sendall(upload[:600])
        door.turn()
        assert door.worker.buffered == 1100, "two requests still arriving"
        abandoned.close()
        door.turn()
        assert door.worker.buffered == 600 and len(door.worker.reading) == 1, "the abandoned one uncounted"
        time.sleep(0.5)
        door.turn()
        assert late.recv(4096).startswith(b"HTTP/1.1 408 ")
        assert door.worker.buffered == 0 and not door.worker.reading
    finally:
        door.close()


def test_out_of_descriptors_the_door_pauses_accepting_instead_of_ending_the_worker():
    class Exhausted:
        def accept(self):
            raise OSError(errno.EMFILE, "Too many open files")

    door = DoorUnderTest(max_queue=1)
    try:
        door.worker.sockets = []
        door.worker._accepting = True
        door.worker.accept(Exhausted())  # gthread re-raises, and the worker exits
        assert not door.worker._accepting and door.worker.accept_paused_until > time.monotonic()
        door.worker.set_accept_enabled(True)
        assert not door.worker._accepting, "paused for ACCEPT_PAUSE_SECONDS"
    finally:
        door.close()


def test_at_the_connection_cap_the_oldest_idle_connection_makes_room():
    door = DoorUnderTest(max_queue=1)
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        door.worker.worker_connections = 2
        idle, slow = door.connect(), door.connect()
        slow.sendall(b"GET /health HTTP/1.1\r\n")
        door.turn()
        newcomer = socket.create_connection(listener.getsockname())
        door.worker.accept(listener)
        assert door.worker.nr_conns == 2 and len(door.worker.reading) == 2
        idle.settimeout(5)
        assert idle.recv(4096).startswith(b"HTTP/1.1 503 "), "the oldest connection made room"
        newcomer.close()
    finally:
        listener.close()
        door.close()


@pytest.mark.system
def test_overload_gets_503_at_once_deadlines_hold_and_health_stays_fast(door_server):
    """300 clients at once, 3 uploads each (900), REQUEST_TIMEOUT=3, CLIP.sh's defaults."""
    base, _ = door_server
    data = image_bytes("JPEG", (1920, 1080), (200, 30, 30))
    results, health, stop_polling = [], [], threading.Event()

    def client():
        with requests.Session() as session:
            for _ in range(3):
                began = time.monotonic()
                response = session.post(f"{base}/analyze", files={"file": ("a.jpg", data)}, timeout=30)
                body = response.json()
                results.append((response.status_code, time.monotonic() - began,
                                response.headers.get("Retry-After"), body["status"],
                                body["metadata"]["processing_time"]))

    def poll_health():
        while not stop_polling.is_set():
            began = time.monotonic()
            status = requests.get(f"{base}/health", timeout=10).status_code
            health.append((time.monotonic() - began, status))
            time.sleep(0.1)

    # 300 client threads share this process's GIL (and its heap, which a full garbage collection
    # would walk mid-storm): a thread can wait for the GIL long after its answer arrived. The server
    # says when it answered (processing_time counts from the request's first byte), so "at once" is
    # its figure; what the clients saw is held to the deadline, and most of it to "at once" as well.
    gc.freeze()
    poller = threading.Thread(target=poll_health)
    poller.start()
    clients = [threading.Thread(target=client) for _ in range(300)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    stop_polling.set()
    poller.join()
    gc.unfreeze()
    counts = collections.Counter(status for status, *_ in results)
    refused = sorted(seconds for status, seconds, *_ in results if status == 503)
    refused_by_server = max(server for status, *_, server in results if status == 503)
    slowest, health_slowest = max(seconds for _, seconds, *_ in results), max(s for s, _ in health)
    print(f"\n900 uploads: {dict(counts)}; slowest answer {slowest:.2f} s; 503s as the clients saw them: "
          f"p50 {refused[len(refused) // 2]:.3f} s, p95 {refused[len(refused) * 95 // 100]:.3f} s, slowest "
          f"{refused[-1]:.2f} s, as the server timed them: slowest {refused_by_server:.3f} s; /health "
          f"slowest {health_slowest:.3f} s over {len(health)} polls")
    assert set(counts) <= {200, 503, 504} and counts[200] >= 8 and counts[503] >= 450
    assert all(retry == "1" for status, _, retry, *_ in results if status == 503)
    assert all(state == ("success" if status == 200 else "error") for status, _, _, state, _ in results)
    assert refused_by_server < 1.0, "a refusal must come at once"
    assert refused[len(refused) * 95 // 100] < 1.0, "a refusal must come at once"
    assert slowest < 3 + 1, "no answer later than REQUEST_TIMEOUT plus a second"
    assert health_slowest < 1.0 and {status for _, status in health} == {200}


def drip(port: int, message: bytes, at_once: int, stop_dripping: threading.Event, answers: list) -> None:
    """Send `at_once` bytes of message, then the rest a byte a second, until an answer begins; keep
    (what came back, seconds from the first byte sent to the answer's first byte)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        began = time.monotonic()
        sock.sendall(message[:at_once])
        for index in range(at_once, len(message)):
            if stop_dripping.is_set():
                break
            try:
                sock.send(message[index:index + 1])
            except OSError:  # cut at the deadline
                break
            if select.select([sock], [], [], 1)[0]:  # a second's wait, cut short by the answer's arrival
                break
        answered = time.monotonic() - began
        try:
            answers.append((read_answer(sock, 2), answered))
        except OSError:
            answers.append((b"", answered))


def traffic_beside_slow_clients(base: str, port: int, seconds: float, wait_for_cut: bool) -> list[bytes]:
    """32 connections drip headers and 32 an upload body at 1 byte/s to `port`, while one client
    checks /health and uploads at `base` for `seconds`. Then the drippers are stopped, or with
    `wait_for_cut` left to the server to cut; returns what they got back."""
    data = image_bytes("JPEG", (640, 480), (30, 200, 30))
    body, content_type = upload_body(data)
    header_drip = b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Pad: " + b"a" * 200 + b"\r\n\r\n"
    body_drip = (f"POST /analyze HTTP/1.1\r\nHost: localhost\r\nContent-Type: {content_type}\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    stop_dripping, answers = threading.Event(), []
    drippers = [threading.Thread(target=drip, args=(port, header_drip, 0, stop_dripping, answers))
                for _ in range(32)]
    drippers += [threading.Thread(target=drip, args=(port, body_drip, len(body_drip) - len(body),
                                                     stop_dripping, answers)) for _ in range(32)]
    for thread in drippers:
        thread.start()
    time.sleep(1.0)
    health_times, upload_times, statuses = [], [], []
    began = time.monotonic()
    try:
        while time.monotonic() - began < seconds:
            moment = time.monotonic()
            statuses.append(requests.get(f"{base}/health", timeout=10).status_code)
            health_times.append(time.monotonic() - moment)
            moment = time.monotonic()
            statuses.append(requests.post(f"{base}/analyze", files={"file": ("a.jpg", data)},
                                          timeout=10).status_code)
            upload_times.append(time.monotonic() - moment)
    finally:
        if not wait_for_cut:
            stop_dripping.set()
        for thread in drippers:
            thread.join(timeout=15)
        stop_dripping.set()
    print(f"\n64 slow connections: /health slowest {max(health_times):.3f} s, uploads slowest "
          f"{max(upload_times):.3f} s over {len(upload_times)} uploads")
    assert set(statuses) == {200}
    assert max(health_times) < 1.0 and max(upload_times) < 2.0
    return answers


@pytest.mark.system
def test_slow_clients_leave_health_and_uploads_alone(door_server):
    """Straight at CLIP.sh: the drippers cost nothing but a socket, and each is cut at its deadline."""
    base, port = door_server
    began = time.monotonic()
    answers = traffic_beside_slow_clients(base, port, seconds=2.5, wait_for_cut=True)
    cut = sorted(seconds for answer, seconds in answers if answer.startswith(b"HTTP/1.1 408 "))
    print(f"{len(cut)} of {len(answers)} drippers got 408 after {time.monotonic() - began:.1f} s, "
          f"{cut[0]:.2f} to {cut[-1]:.2f} s after their first byte" if cut else "no 408")
    assert len(cut) == 64, "each dripper is cut at REQUEST_TIMEOUT"
    # REQUEST_TIMEOUT=3 here: not before it, and no later than the README's REQUEST_TIMEOUT + 1 s
    assert cut[0] >= 2.9 and cut[-1] <= 4.0, cut


@pytest.mark.system
def test_framing_the_door_refuses_or_handles(door_server):
    base, port = door_server
    data = image_bytes("JPEG", (320, 240), (30, 30, 200))
    body, content_type = upload_body(data)

    def exchange(raw: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(raw)
            return read_answer(sock)

    chunked = exchange(b"POST /analyze HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
                       b"Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert chunked.startswith(b"HTTP/1.1 411 ") and b"Content-Length" in chunked

    began = time.monotonic()
    huge = exchange(b"POST /analyze HTTP/1.1\r\nHost: localhost\r\nContent-Type: " + content_type.encode()
                    + b"\r\nContent-Length: 999999999\r\n\r\n")
    assert huge.startswith(b"HTTP/1.1 413 ") and time.monotonic() - began < 1.0

    too_long = exchange(b"GET /health HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 70_000 + b"\r\n\r\n")
    assert too_long.startswith(b"HTTP/1.1 431 ")
    long_line = exchange(b"GET /analyze?labels=" + b"a" * 9000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert long_line.startswith(b"HTTP/1.1 414 ") and b"POST form" in long_line

    with socket.create_connection(("127.0.0.1", port)) as sock:  # curl's Expect: 100-continue
        sock.sendall((f"POST /analyze HTTP/1.1\r\nHost: localhost\r\nContent-Type: {content_type}\r\n"
                      f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
                      ).encode())
        sock.settimeout(5)
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        answer = read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"100 Continue") == 0

    garbage = exchange(b"NONSENSE\r\n\r\n")
    assert garbage.startswith(b"HTTP/1.1 400 ")

    # Keep-alive and pipelining: every request on one connection goes through the door too.
    one = b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"
    last = b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    assert exchange(one + one + last).count(b"HTTP/1.1 200 ") == 3
    with requests.Session() as session:
        for _ in range(3):
            assert session.post(f"{base}/analyze", files={"file": ("a.jpg", data)},
                                timeout=10).status_code == 200


def test_threads_beyond_max_queue_stop_start_up():
    from clip_service.settings import SettingsError, settings_from_mapping

    with pytest.raises(SettingsError, match="THREADS=16 exceeds MAX_QUEUE=8"):
        settings_from_mapping({"THREADS": "16", "MAX_QUEUE": "8"})
    assert settings_from_mapping({"MAX_QUEUE": "4"}).serving_threads == 4
    assert settings_from_mapping({}).serving_threads == 16, "two CPU batches: one in the model, one arriving"


@pytest.mark.system
def test_slow_clients_through_nginx_leave_health_and_uploads_alone(door_server, tmp_path):
    """The same drippers against services/nginx-clip.conf in front of CLIP.sh."""
    require_nginx()
    _, service_port = door_server
    nginx_port = free_port()
    main = nginx_config(tmp_path, nginx_port, [service_port, service_port])
    nginx = start_nginx(main)
    base = f"http://127.0.0.1:{nginx_port}"
    try:
        wait_listening(base, nginx)
        traffic_beside_slow_clients(base, nginx_port, seconds=2.5, wait_for_cut=False)
    finally:
        stop_nginx(nginx)


@pytest.mark.system
def test_clients_that_never_close_do_not_stall_the_event_loop(door_server):
    """40 clients each read a `Connection: close` answer and keep their socket open: gunicorn's own
    graceful close would wait up to 2 s for each on the event loop, and /health with it."""
    base, port = door_server
    idle = []
    try:
        for _ in range(40):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            idle.append(sock)
        time.sleep(0.5)
        slowest = 0.0
        for _ in range(10):
            began = time.monotonic()
            assert requests.get(f"{base}/health", timeout=10).status_code == 200
            slowest = max(slowest, time.monotonic() - began)
        for sock in idle:  # each got its answer, then the server closed its side
            answer = read_answer(sock, 5)
            assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"}\n")
    finally:
        for sock in idle:
            sock.close()
    print(f"\n40 clients holding closed answers open: /health slowest {slowest:.3f} s")
    assert slowest < 1.0


# Odd requests, each followed by a pipelined GET /health: the door must frame them the same way however
# the bytes arrive, and what it hands on must be what gunicorn's parser then reads.
ODD_REQUESTS = [
    b"GET /health HTTP/1.1\r\nHost: h\r\n\r\n",
    b"\r\nPOST /analyze HTTP/1.1\r\nHost: h\r\nContent-Type: image/png\r\nContent-Length: 4\r\n\r\nabcd",
    b"\r\n\r\nGET /health HTTP/1.1\r\nHost: h\r\n\r\n",
    b"POST /analyze HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd",
    b"POST /analyze HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
    b"POST /analyze HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /analyze HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n",
    b"POST /health HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /analyze HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked \r\n\r\n0\r\n\r\n",
    b"POST /analyze HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: h\r\nX: a\r\n folded\r\n\r\n",
    b"GET /health HTTP/1.1\nHost: h\n\n",
    b"POST /analyze HTTP/1.1\r\nHost: h\r\nContent-Length: +4\r\n\r\nabcd",
    b"POST /analyze HTTP/1.1\r\nHost: h\r\nContent-Length: 0x4\r\n\r\nabcd",
    b"GET /health\r\n\r\n",
    b"GET http://h/health HTTP/1.1\r\nHost: h\r\n\r\n",
    b"POST /health HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc",
    b"POST /analyze HTTP/1.0\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\nab",
    b"OPTIONS /analyze HTTP/1.1\r\nHost: h\r\nOrigin: http://h\r\n\r\n",
    b"GET /hea%6Cth?x=%00 HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nX\x00Y: 1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nX: \x01\r\n\r\n",
    b"get /health HTTP/1.1\r\nHost: h\r\n\r\n",
    b"PUT /health HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n",
]
PIPELINED = b"GET /health HTTP/1.1\r\nHost: h\r\n\r\n"


def door_verdicts(raw: bytes, splits: list[int]) -> list:
    """What the door does with `raw` arriving in pieces cut at `splits`: the requests it hands on
    (method, path, body) and the refusal that ends the connection, if any."""
    door = FrontDoorWorker(0, os.getpid(), [], None, 30, Config(), logging.getLogger("door-test"))
    door.poller = selectors.DefaultSelector()
    verdicts = []

    def hand_on(conn, light):
        door._forget(conn)
        verdicts.append(("handed on", conn.request[0], b"".join(conn.request[1:])))
        door._start_reading(conn, conn.leftover)  # as once its answer is sent

    def refuse(conn, status, message, retry_after=None):
        door._forget(conn)
        verdicts.append(("refused", status))

    door._hand_on, door._refuse = hand_on, refuse
    client, server = socket.socketpair()
    try:
        conn = DoorConnection(door.cfg, server, ("127.0.0.1", 1), ("127.0.0.1", 2))
        door._start_reading(conn, b"")
        for start, end in zip([0, *splits], [*splits, len(raw)], strict=True):
            if conn not in door.reading:
                break
            door._receive(conn, raw[start:end])
            door._advance(conn)
    finally:
        client.close()
        server.close()
        door.poller.close()
    return verdicts


def gunicorn_reads(request: list[bytes]) -> tuple[str, str, bytes]:
    from gunicorn import http, util

    parsed = next(http.get_parser(Config(), iter(request), ("127.0.0.1", 1)))
    return parsed.method, util.unquote_to_wsgi_str(parsed.path), parsed.body.read()


@pytest.mark.parametrize("raw", ODD_REQUESTS, ids=range(len(ODD_REQUESTS)))
def test_the_door_frames_odd_requests_alike_at_every_split_and_as_gunicorn_reads_them(raw):
    whole = raw + PIPELINED
    expected = door_verdicts(whole, [])
    assert expected, "every request gets a verdict"
    for split in range(1, len(whole)):
        assert door_verdicts(whole, [split]) == expected, f"cut at byte {split}"
    assert door_verdicts(whole, list(range(1, len(whole)))) == expected, "a byte at a time"
    for kind, *request in expected:
        if kind == "handed on":  # gunicorn reads exactly what the door framed
            head = parse_head(request[0])
            assert gunicorn_reads(request) == (head.method, head.path, request[1])
    if expected[0][0] == "handed on":
        assert expected[-1] == ("handed on", PIPELINED, b""), "the pipelined request starts where h11 said"


def test_reading_a_body_past_the_deadline_fails_each_read():
    """The multipart parse reads the body in many pieces: past REQUEST_TIMEOUT the next read is a 504."""
    import io

    from clip_service.errors import DeadlineExceeded
    from clip_service.http.front_door import StampArrival, _thread

    seen = {}

    def app(environ, start_response):
        seen["first"] = environ["wsgi.input"].read(3)
        time.sleep(0.3)
        with pytest.raises(DeadlineExceeded):
            environ["wsgi.input"].read(3)
        return []

    _thread.arrived = time.monotonic()
    try:
        StampArrival(app, request_timeout=0.2)({"wsgi.input": io.BytesIO(b"abcdef")}, None)
    finally:
        _thread.arrived = None
    assert seen["first"] == b"abc"
