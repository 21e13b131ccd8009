"""Fixtures: a tiny CLIP in local-dir layout and its engine, labels, settings, app -> client, CLIP.sh's
environment, a loopback HTTP server, and a network fence. Shared code that is not a fixture lives in
tests/support/; no test module imports another.

The fence is autouse: any connection to an address outside loopback fails the test instead of
sending a packet, so a broken SSRF guard is caught without traffic leaving the machine.

Tests marked `system` start real servers or system programs (CLIP.sh, REST.py, nginx, chromium,
systemd-analyze); `pytest -m "not system"` runs the rest alone, and a test that starts one unmarked
fails (tests/support/guard.py).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
from pathlib import Path

import pytest

from clip_service import Settings, create_app
from tests.support import guard
from tests.support.http_fixtures import LocalServer
from tests.support.live_client import LiveClient
from tests.support.models import load_tiny_engine, write_tiny_clip
from tests.support.server import ROOT, ClipServer, clean_environment, clip_sh_env
from tests.support.trained_clip import trained_model
from tests.support.vocabulary import EMOJI, LABELS


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before any fixture of the test is set up: may it start servers and system programs?"""
    guard.running_test = item.nodeid
    guard.running_test_is_system = item.get_closest_marker("system") is not None


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
    """A tiny CLIP trained to name colours (tests/support/trained_clip.py), kept in pytest's cache folder
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


@pytest.fixture
def local_server():
    server = LocalServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir):
    """The torch engine on the tiny model, loaded once for the session: wrap it, and patch it only
    through monkeypatch, which puts it back."""
    return load_tiny_engine(tiny_model_dir)


@pytest.fixture
def server_env(settings, tmp_path, local_server) -> dict[str, str]:
    """CLIP.sh's settings for the `settings` fixture's model, labels and emoji: one worker of four
    threads, url= allowed to 127.0.0.1 (local_server), file= under tmp_path, the emoji API at
    local_server."""
    return clip_sh_env(settings.clip_model, settings.labels_dir, settings.emoji_dictionary,
                       tmp_path / "cache", api_port=local_server.port, api_timeout=1,
                       URL_ALLOWLIST="127.0.0.1", ALLOWED_FILE_ROOTS=tmp_path, WORKERS=1, THREADS=4)


@pytest.fixture
def clean_env(monkeypatch):
    """This process's environment as clean_environment() gives it to a server, for commands run
    in-process (the tag command's main()); the monkeypatch, to change it further."""
    cleaned = clean_environment()
    for name in set(os.environ) - set(cleaned):
        monkeypatch.delenv(name)
    monkeypatch.setenv("CLIP_ENV_FILE", cleaned["CLIP_ENV_FILE"])
    return monkeypatch


@pytest.fixture(scope="session")
def clip_sh(tiny_model_dir, labels_dir, emoji_file, tmp_path_factory):
    """One CLIP.sh for the session, configured as the `settings` fixture's app (file= under any test's
    tmp_path), behind the fail-closed network fence of tests/support/fence: the hostile cases and the
    API description's checks run through the front door and gunicorn as well as in-process."""
    folder = tmp_path_factory.mktemp("clip-sh")
    env = clip_sh_env(f"local-dir:{tiny_model_dir}", labels_dir, emoji_file, folder / "cache", api_port=9,
                      api_timeout=0.2, ALLOWED_FILE_ROOTS=tmp_path_factory.getbasetemp(),
                      PYTHONPATH=f"{ROOT / 'tests' / 'support' / 'fence'}:{ROOT}")
    server = ClipServer(env, folder / "clip-sh.log")
    yield server
    server.stop()


@pytest.fixture
def clip_sh_client(clip_sh) -> LiveClient:
    """Flask's test client's calls, sent to the session's CLIP.sh."""
    return LiveClient(clip_sh.port)
