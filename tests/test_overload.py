"""Overload and deadlines over real HTTP: the app in a threaded werkzeug server, a slow engine.

Admission control must refuse what does not fit (503 + Retry-After) instead of queueing it for ever,
/health must keep answering while the worker is saturated, and a request the model cannot answer in
REQUEST_TIMEOUT must get a 504 without tying up the worker.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import pytest
import requests
from conftest import QuietHandler, serve_http, stop_http
from fake_engines import SlowEngine, load_tiny_engine
from test_routes import ERROR_KEYS, image_bytes
from werkzeug.serving import make_server

CLIENT_TIMEOUT = 15


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir):
    return load_tiny_engine(tiny_model_dir)


class ServedApp:
    """The Flask app behind werkzeug's threaded server on 127.0.0.1, in a background thread."""

    def __init__(self, app):
        self.app = app
        self.service = app.extensions["clip_service"]
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.base = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def upload(self, data: bytes | None = None, timeout: float = CLIENT_TIMEOUT) -> requests.Response:
        return requests.post(f"{self.base}/analyze", files={"file": ("x.png", data or image_bytes())},
                             timeout=timeout)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serve(make_app):
    served = []
    werkzeug_log = logging.getLogger("werkzeug")
    level = werkzeug_log.level
    werkzeug_log.setLevel(logging.WARNING)  # no line per request

    def start(settings, engine=None) -> ServedApp:
        served.append(ServedApp(make_app(settings, engine=engine)))
        return served[-1]

    yield start
    for one in served:
        one.close()
    werkzeug_log.setLevel(level)


def assert_error_shape(response: requests.Response, status: int, fragment: str = "") -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == ERROR_KEYS
    assert (body["service"], body["status"], body["predictions"]) == ("clip", "error", [])
    assert fragment in body["error"]["message"], body["error"]["message"]
    return body


def test_overload_refuses_with_503_and_health_stays_up(serve, settings, tiny_engine):
    engine = SlowEngine(tiny_engine, delay=0.5)
    served = serve(dataclasses.replace(settings, max_queue=4, health_canary_seconds=0), engine)
    sent = 40
    data = image_bytes()
    start = threading.Barrier(sent + 1)
    results: list[tuple[int, float, requests.Response | Exception]] = [None] * sent

    def one(index: int) -> None:
        start.wait()
        began = time.monotonic()
        try:
            answer = served.upload(data)
        except requests.RequestException as error:  # a hang shows as a client timeout here
            answer = error
        results[index] = (index, time.monotonic() - began, answer)

    health: list[tuple[int | str, float, bool]] = []  # status, seconds, asked while the worker was full
    loading = threading.Event()

    def poll_health() -> None:
        while loading.is_set():
            began = time.monotonic()
            full = served.service.in_flight >= 4
            try:
                status = requests.get(f"{served.base}/health", timeout=5).status_code
            except requests.RequestException as error:
                status = type(error).__name__
            health.append((status, time.monotonic() - began, full and served.service.in_flight >= 4))
            time.sleep(0.05)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(sent)]
    for thread in threads:
        thread.start()
    loading.set()
    poller = threading.Thread(target=poll_health, daemon=True)
    poller.start()
    began = time.monotonic()
    start.wait()
    for thread in threads:
        thread.join(CLIENT_TIMEOUT + 5)
    elapsed = time.monotonic() - began
    time.sleep(0.1)  # one more health poll after the burst
    loading.clear()
    poller.join(10)

    assert not any(thread.is_alive() for thread in threads), "a request hung"
    failures = [r for r in results if not isinstance(r[2], requests.Response)]
    assert not failures, f"requests without an HTTP answer: {failures}"
    statuses = [r[2].status_code for r in results]
    ok, busy = statuses.count(200), statuses.count(503)
    assert ok + busy == sent, f"only 200 or 503 expected, got {sorted(set(statuses))}"
    assert ok >= 1 and busy >= 1
    for _, seconds, response in results:
        if response.status_code == 503:
            assert_error_shape(response, 503, "MAX_QUEUE=4")
            assert int(response.headers["Retry-After"]) >= 1
            assert seconds < 2.0, "a refusal is immediate, not queued"
        else:
            assert response.json()["status"] == "success"
    assert elapsed < 10
    health_codes = [status for status, _, _ in health]
    assert len(health_codes) >= 3 and set(health_codes) == {200}, health_codes
    while_full = sum(full for _, _, full in health)
    assert while_full >= 1, "no /health poll landed while MAX_QUEUE requests were in flight"
    slowest_health = max(seconds for _, seconds, _ in health)
    assert slowest_health < 2.0

    assert served.service.in_flight == 0
    after = served.upload(data)
    assert after.status_code == 200 and after.json()["status"] == "success"
    print(f"\noverload: MAX_QUEUE=4, engine +0.5 s per batch: sent={sent} concurrent uploads, "
          f"200={ok}, 503={busy}, other=0, all answered in {elapsed:.2f} s; /health polled "
          f"{len(health_codes)} times ({while_full} while the worker was full), all 200 "
          f"(slowest {slowest_health:.3f} s); batches={engine.batches}")


def test_request_timeout_gives_504_and_frees_the_worker(serve, settings, tiny_engine):
    engine = SlowEngine(tiny_engine, delay=2.0)
    served = serve(dataclasses.replace(settings, request_timeout=0.5, health_canary_seconds=0), engine)
    began = time.monotonic()
    response = served.upload()
    took = time.monotonic() - began
    assert_error_shape(response, 504, "REQUEST_TIMEOUT")
    assert took < 1.2, f"the 504 came after {took:.2f} s"
    assert served.service.in_flight == 0, "the timed-out request still holds its place"

    # While the model still works on the abandoned image, a new request is answered in time too.
    began = time.monotonic()
    meanwhile = served.upload()
    assert meanwhile.status_code in (200, 504) and time.monotonic() - began < 1.2

    engine.delay = 0
    assert engine.finished.wait(5), "the slow batch never finished"
    time.sleep(0.05)
    after = served.upload()
    assert after.status_code == 200, after.text
    assert after.json()["status"] == "success"
    print(f"\ndeadline: REQUEST_TIMEOUT=0.5 s, engine 2 s -> 504 after {took:.2f} s; next request 200")


class SilentUpstream:
    """An HTTP server on 127.0.0.1 that accepts a request and answers after `delay` seconds."""

    def __init__(self, delay: float, body: bytes):
        released = self.released = threading.Event()

        class Handler(QuietHandler):
            def do_GET(self):
                if released.wait(delay):
                    return
                self.answer(200, body)

        self.server = serve_http(Handler)
        self.port = self.server.server_address[1]

    def close(self):
        self.released.set()
        stop_http(self.server)


@pytest.fixture
def silent_upstream():
    upstream = SilentUpstream(delay=5, body=image_bytes())
    yield upstream
    upstream.close()


def fetch_from_silent_upstream(serve, settings, engine, upstream,
                               ) -> tuple[ServedApp, requests.Response, float]:
    """A url= request under REQUEST_TIMEOUT=0.5 s and URL_TIMEOUT=10 s, to an upstream that waits 5 s."""
    served = serve(dataclasses.replace(settings, request_timeout=0.5, url_timeout=10,
                                       url_allowlist=("127.0.0.1",)), engine)
    began = time.monotonic()
    response = requests.get(f"{served.base}/analyze", timeout=CLIENT_TIMEOUT,
                            params={"url": f"http://127.0.0.1:{upstream.port}/slow.png"})
    return served, response, time.monotonic() - began


def test_request_timeout_bounds_url_fetching(serve, settings, tiny_engine, silent_upstream):
    served, response, took = fetch_from_silent_upstream(serve, settings, tiny_engine, silent_upstream)
    assert_error_shape(response, 504)
    assert took < 1.2, f"the fetch was cut after {took:.2f} s, not at the 0.5 s deadline"
    assert served.service.in_flight == 0
    assert served.upload().status_code == 200


def test_a_fetch_cut_by_the_request_deadline_names_that_deadline(serve, settings, tiny_engine,
                                                                 silent_upstream):
    _, response, _ = fetch_from_silent_upstream(serve, settings, tiny_engine, silent_upstream)
    message = assert_error_shape(response, 504)["error"]["message"]
    assert "10 s" not in message, message  # it was cut after 0.5 s
    assert "REQUEST_TIMEOUT" in message, message
