"""The foundations the code subclasses or patches are the versions pinned, with the internals it uses.

An upgrade that removes or renames one of them fails here, naming it, instead of in production (a
front door that no longer frames, or a URL guard that no longer guards).
"""

from __future__ import annotations

import logging
import os
import re
from importlib import metadata
from pathlib import Path

import h11
import pytest
import urllib3
from gunicorn import http as gunicorn_http
from gunicorn import util as gunicorn_util
from gunicorn.config import Config
from gunicorn.http import unreader
from gunicorn.workers import gthread

from clip_service.http.front_door import FrontDoorWorker

ROOT = Path(__file__).resolve().parents[1]
PINNED = ("gunicorn", "h11", "urllib3")

# What the front door reads or overrides of gunicorn's threaded worker, by where it lives.
GTHREAD_WORKER = ("method_queue", "poller", "nr_conns", "tpool", "keepalived_conns", "worker_connections",
                  "cfg", "log", "alive", "sockets", "_accepting")
GTHREAD_METHODS = ("set_accept_enabled", "accept", "on_client_socket_readable", "murder_pending",
                   "murder_keepalived", "finish_request", "handle", "handle_request", "handle_error",
                   "init_process", "init_signals", "load_wsgi", "run", "check_config")
TCONN = ("set_timeout", "close", "init")
H11 = ("trailing_data", "they_are_waiting_for_100_continue", "receive_data", "next_event")
URLLIB3_CONNECTION = ("_new_conn",)


def pinned_version(name: str) -> str:
    text = (ROOT / "requirements.txt").read_text()
    match = re.search(rf"(?m)^{re.escape(name)}==(\S+)", text)
    assert match, f"requirements.txt must pin {name} with =="
    return match[1]


@pytest.mark.parametrize("name", PINNED)
def test_installed_is_pinned(name):
    assert metadata.version(name) == pinned_version(name), (
        f"{name} {metadata.version(name)} is installed but requirements.txt pins {pinned_version(name)}: "
        "run tests/test_front_door.py and tests/test_url_fetch.py on the new version, then move the pin")


def missing(owner, names) -> list[str]:
    return [f"{getattr(owner, '__name__', type(owner).__name__)}.{name}" for name in names
            if not hasattr(owner, name)]


def test_the_internals_the_front_door_uses_are_there():
    worker = FrontDoorWorker(0, os.getpid(), [], None, 30, Config(), logging.getLogger("pin-test"))
    worker.poller = None  # set by init_process, which the test does not run
    gone = missing(worker, GTHREAD_WORKER) + missing(gthread.ThreadWorker, GTHREAD_METHODS)
    gone += missing(gthread.TConn, TCONN) + missing(gthread.PollableMethodQueue, ("defer", "init"))
    gone += missing(gunicorn_http, ("get_parser",)) + missing(gunicorn_util, ("close",))
    gone += missing(unreader, ("IterUnreader",))
    gone += missing(h11.Connection, H11) + missing(h11.RemoteProtocolError("x", 400), ("error_status_hint",))
    gone += missing(h11._headers.Headers, ("raw_items",))
    assert not gone, f"gone from the pinned libraries, used by http/front_door.py: {', '.join(gone)}"


def test_the_internals_the_url_guard_patches_are_there():
    connection = urllib3.connection.HTTPConnection("127.0.0.1", 9)
    gone = missing(urllib3.connection.HTTPConnection, URLLIB3_CONNECTION)
    gone += [] if hasattr(connection, "_dns_host") else ["HTTPConnection._dns_host"]
    assert not gone, f"gone from urllib3, patched by inputs/url_fetch.py: {', '.join(gone)}"


def test_gunicorn_reads_an_iterable_with_its_iterable_reader():
    """The door hands gunicorn's parser the request in pieces; it must read them as they are."""
    parser = gunicorn_http.get_parser(Config(), iter([b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"]), ("h", 1))
    assert isinstance(parser.unreader, unreader.IterUnreader), "gunicorn no longer takes an iterable source"
    assert next(parser).path == "/"
