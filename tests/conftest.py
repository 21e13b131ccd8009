"""Fixtures: a tiny CLIP in local-dir layout, labels, settings, app -> client, and a network fence.

The fence is autouse: any connection to an address outside loopback fails the test instead of
sending a packet, so a broken SSRF guard is caught without traffic leaving the machine.
"""

from __future__ import annotations

import contextlib
import ipaddress
import signal
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_clip import write_tiny_clip  # noqa: E402
from trained_clip import trained_model  # noqa: E402

from clip_service import Settings, create_app  # noqa: E402

LABELS = {
    "animals": ["cat", "dog", "horse", "bird"],
    "foods": ["banana", "coffee", "pizza"],
    "people": ["man", "woman", "astronaut"],
}
EMOJI = {"cat": "🐱", "dog": "🐕", "horse": "🐴", "bird": "🐦", "banana": "🍌", "coffee": "☕",
         "pizza": "🍕", "man": "👨", "woman": "👩"}


class ForbiddenConnection(AssertionError):
    """Raised instead of connecting anywhere but loopback."""


def _is_loopback(address) -> bool:
    host = address[0] if isinstance(address, tuple) else address
    if not isinstance(host, str) or host.startswith("/"):
        return True  # unix sockets stay on this machine
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False  # an unresolved name: refuse, the guard must connect by address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback


@pytest.fixture
def fake_dns() -> dict[str, list[str]]:
    """Host name -> addresses the patched resolver answers; tests add names they need."""
    return {"localhost": ["127.0.0.1"], "localhost.": ["127.0.0.1"]}


@pytest.fixture(autouse=True)
def network_fence(monkeypatch, fake_dns):
    """Fail closed: a connection beyond loopback is a test failure, never a packet.

    Names resolve only through `fake_dns` (no DNS query leaves the machine); numeric forms such as
    2130706433 or 0177.0.0.1 are parsed by the real resolver without a query.
    """
    attempts = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        name = host.decode() if isinstance(host, bytes) else host
        try:
            return real_getaddrinfo(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)
        except socket.gaierror:
            if name is None or name.lower() not in fake_dns:
                raise socket.gaierror(socket.EAI_NONAME, f"fake resolver does not know {name}") from None
        answers = []
        for address in fake_dns[name.lower()]:
            answers += real_getaddrinfo(address, port, family, type, proto, socket.AI_NUMERICHOST)
        return answers

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)

    def guarded(real):
        def connect(self, address):
            if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
                attempts.append(address)
                raise ForbiddenConnection(f"test tried to connect to {address}")
            return real(self, address)
        return connect

    monkeypatch.setattr(socket.socket, "connect", guarded(real_connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guarded(real_connect_ex))
    yield attempts


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def trained_model_dir(request, tmp_path_factory) -> Path:
    """A tiny CLIP trained to name colours (tests/trained_clip.py), kept in pytest's cache folder
    between runs; trained into a temporary folder when there is no writable cache."""
    cache = getattr(request.config, "cache", None)  # None with -p no:cacheprovider
    if cache is not None:
        with contextlib.suppress(OSError):
            return trained_model(cache.mkdir("trained-clip"))
    return trained_model(tmp_path_factory.mktemp("trained-clip"))


@pytest.fixture(scope="session")
def labels_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("labels")
    for group, labels in LABELS.items():
        (folder / f"{group}.txt").write_text(f"# {group}\n" + "\n".join(labels) + "\n")
    return folder


@pytest.fixture(scope="session")
def emoji_file(tmp_path_factory) -> Path:
    import json

    path = tmp_path_factory.mktemp("emoji") / "emoji.json"
    path.write_text(json.dumps(EMOJI, ensure_ascii=False))
    return path


@pytest.fixture
def settings(tiny_model_dir, labels_dir, emoji_file, tmp_path) -> Settings:
    """Settings for the tiny model on the torch engine (OpenVINO has its own tests, which convert the
    model; every app here would convert it again); the emoji API points at a closed loopback port."""
    return Settings(
        clip_model=f"local-dir:{tiny_model_dir}", backend="torch", labels_dir=labels_dir,
        emoji_dictionary=emoji_file,
        cache_dir=tmp_path / "cache", api_host="127.0.0.1", api_port=9, api_timeout=0.2,
        emoji_retry_seconds=0.2, confidence_threshold=0.0, private=False,
        allowed_file_roots=(tmp_path.resolve(),),
    )


@pytest.fixture
def make_app():
    """Build an app from settings and wait until its model has loaded (or failed)."""
    apps = []

    def make(settings: Settings, engine=None, wait: bool = True):
        app = create_app(settings, engine=engine)
        apps.append(app)
        if wait:
            assert app.extensions["clip_service"].wait_until_settled(120)
        return app

    yield make
    for app in apps:
        app.extensions["clip_service"].stop()


@pytest.fixture
def app(make_app, settings):
    return make_app(settings)


@pytest.fixture
def client(app):
    return app.test_client()


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that does not log, with a one-call answer."""

    def answer(self, status: int, body: bytes, headers: dict | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def serve_http(handler: type[BaseHTTPRequestHandler], port: int = 0) -> ThreadingHTTPServer:
    """A threaded HTTP server on 127.0.0.1, serving in a daemon thread; stop it with stop_http."""
    ThreadingHTTPServer.allow_reuse_address = True
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def stop_http(server: ThreadingHTTPServer) -> None:
    server.shutdown()
    server.server_close()


@contextlib.contextmanager
def no_hang(seconds: int = 10):
    """Fail a request that hangs instead of hanging the test run (main thread, Unix)."""

    def hung(signum, frame):
        raise TimeoutError(f"the request was still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


class LocalServer:
    """A real HTTP server on 127.0.0.1; `routes` maps a path to (status, headers, body)."""

    def __init__(self, port: int = 0):
        routes = self.routes = {}
        hits = self.hits = []

        class Handler(QuietHandler):
            def do_GET(self):
                hits.append(self.path)
                status, headers, body = routes.get(self.path, (404, {}, b"not found"))
                self.answer(status, body, headers)

        self.server = serve_http(Handler, port)
        self.port = self.server.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self):
        stop_http(self.server)


@pytest.fixture
def local_server():
    server = LocalServer()
    yield server
    server.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
