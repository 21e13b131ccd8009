"""gunicorn's threaded worker behind a front door that reads whole requests before they take a thread.

gthread hands every connection to one of THREADS threads, which then reads the request with blocking
calls: a client dripping its headers or body holds a thread for as long as it likes, and requests
beyond THREADS wait in an unbounded queue that neither MAX_QUEUE nor REQUEST_TIMEOUT can see. Here
the worker's event loop reads each request (its headers and a Content-Length body) without blocking,
under a deadline counted from the request's arrival, and hands on only a complete request:
- light routes (/health, /metrics, the page) to a small pool of their own, so they answer under any
  load;
- every other request to one of at most MAX_QUEUE places, or a 503 with Retry-After at once.
The arrival time travels to the app in the WSGI environ (ARRIVED_KEY), so REQUEST_TIMEOUT counts
from the moment the first byte arrived, not from when a thread became free.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import selectors
import signal
import socket
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from urllib.parse import urlsplit

from gunicorn.workers import gthread

from clip_service.http.limits import BodyLimits

ARRIVED_KEY = "clip_service.arrived"
LIGHT_PATHS = frozenset({"/", "/health", "/metrics", "/labels", "/openapi.json", "/favicon.ico"})
LIGHT_THREADS = 2
HEAD_LIMIT = 64 * 1024  # request line and headers together
READ_CHUNK = 256 * 1024
READ_PER_EVENT = 4 * 1024 * 1024  # one fast upload must not keep the event loop from the others
LINGER_SECONDS = 2.0  # after a refusal, how long unread request bytes are drained before closing

_thread = threading.local()


def is_light(head: Head) -> bool:
    """Cheap requests that must answer under any load: health, metrics, the page, CORS preflights."""
    return head.method == "OPTIONS" or head.path in LIGHT_PATHS or head.path.startswith("/static/")


@dataclass(frozen=True)
class Head:
    """What the door needs to know of a request before its body."""

    method: str
    path: str
    content_length: int
    chunked: bool
    size: int  # bytes of the request line and headers, blank line included
    expect_line: tuple[int, int] | None  # (start, end) of an `Expect: 100-continue` line in the head
    media_type: str = ""  # Content-Type without parameters, lower case: sizes the body (http/limits.py)


def parse_head(data: bytes) -> Head:
    """The request line and headers (ending in a blank line) -> Head; ValueError if malformed.

    Only what routing and sizing need is read; gunicorn's own parser still parses the request.
    """
    size = data.index(b"\r\n\r\n") + 4
    lines = data[:size - 4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise ValueError("malformed request line")
    target = parts[1].decode("latin-1")
    path = urlsplit(target).path if "://" in target else target.partition("?")[0]
    lengths, chunked, expect_line, media_type = set(), False, None, ""
    offset = len(lines[0]) + 2
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            raise ValueError("malformed header")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            lengths.add(value)
        elif name == b"transfer-encoding":
            chunked = chunked or b"chunked" in value
        elif name == b"expect" and value == b"100-continue":
            expect_line = (offset, offset + len(line) + 2)
        elif name == b"content-type":
            media_type = value.partition(b";")[0].strip().decode("latin-1")
        offset += len(line) + 2
    if len(lengths) > 1 or any(not value.isdigit() for value in lengths):
        raise ValueError("bad Content-Length")
    return Head(parts[0].decode("latin-1"), path, int(lengths.pop()) if lengths else 0, chunked, size,
                expect_line, media_type)


def error_answer(status: int, message: str, seconds: float, retry_after: int | None = None) -> bytes:
    """A whole HTTP/1.1 answer in the service's error shape, closing the connection."""
    body = json.dumps({"service": "clip", "status": "error", "predictions": [],
                       "error": {"message": message},
                       "metadata": {"processing_time": round(seconds, 3)}}).encode()
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", "Connection: close", "X-Content-Type-Options: nosniff"]
    if retry_after is not None:
        head.append(f"Retry-After: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


class DoorConnection(gthread.TConn):
    """A connection with the bytes the door has read of its current request."""

    def __init__(self, cfg, sock, client, server, linger):
        super().__init__(cfg, sock, client, server)
        self.linger = linger
        self.arrived = self.deadline = 0.0
        self.inbox = bytearray()
        self.head: Head | None = None
        self.heavy = False

    def close(self, graceful: bool = False) -> None:
        """gunicorn closes gracefully from its event loop: hand that to the loop's lingering."""
        if graceful:
            self.linger(self.sock)
        else:
            super().close()

    def begin(self, pending: bytes, timeout: float) -> None:
        self.arrived = time.monotonic()
        self.deadline = self.arrived + timeout
        self.inbox = bytearray(pending)
        self.head = None
        self.heavy = False


class StampArrival:
    """WSGI wrapper: puts the door's arrival time into the environ; otherwise the app itself."""

    def __init__(self, app):
        self.app = app

    def __call__(self, environ, start_response):
        environ[ARRIVED_KEY] = getattr(_thread, "arrived", None)
        return self.app(environ, start_response)

    def __getattr__(self, name):
        return getattr(self.app, name)


class FrontDoorWorker(gthread.ThreadWorker):
    """gthread with the front door above: configured by `door_limits` before it starts."""

    max_queue = 32
    request_timeout = 30.0
    body_limits = BodyLimits(8 * 1024 * 1024, 8 * 1024 * 1024)
    buffer_limit = 512 * 1024 * 1024

    @classmethod
    def check_config(cls, cfg, log):
        if cfg.is_ssl:
            raise RuntimeError("clip-service does not terminate TLS itself; put nginx in front "
                               "(services/nginx-clip.conf) and drop certfile/keyfile")
        super().check_config(cfg, log)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reading: dict[DoorConnection, None] = {}  # insertion order = arrival order
        self.lingering: dict[socket.socket, float] = {}  # refused sockets being drained -> close time
        self.heavy_in_flight = 0
        self.buffered = 0
        self.light_pool: futures.ThreadPoolExecutor | None = None

    def init_process(self):
        self.light_pool = futures.ThreadPoolExecutor(LIGHT_THREADS, thread_name_prefix="clip-light")
        super().init_process()

    def init_signals(self):
        super().init_signals()
        # SIGHUP asks for a reload here (gunicorn.conf.py's post_worker_init installs it once the app is
        # loaded); gunicorn leaves it at the default, which would end a worker still starting up
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def load_wsgi(self):
        super().load_wsgi()
        self.wsgi = StampArrival(self.wsgi)

    # --- the event loop's side: read, decide, hand on ---

    def accept(self, listener):
        try:
            sock, client = listener.accept()
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        self._start_reading(DoorConnection(self.cfg, sock, client, listener.getsockname(), self._linger),
                            b"")

    def enqueue_req(self, conn):
        """gthread's hand-over of a kept-alive connection with pipelined bytes: through the door."""
        self._start_reading(conn, conn.parser.unreader.take_buffered())

    def on_client_socket_readable(self, conn, client):
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._start_reading(conn, b"")

    def _start_reading(self, conn: DoorConnection, pending: bytes) -> None:
        conn.sock.setblocking(False)
        conn.begin(pending, self.request_timeout)
        self.buffered += len(pending)
        self.reading[conn] = None
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))
        if pending:
            self._advance(conn)

    def _on_readable(self, conn: DoorConnection, _sock) -> None:
        received = 0
        try:
            while received < READ_PER_EVENT:
                chunk = conn.sock.recv(READ_CHUNK)
                if not chunk:  # the client went away
                    self._forget(conn)
                    self._close(conn)
                    return
                conn.inbox += chunk
                received += len(chunk)
                self.buffered += len(chunk)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._forget(conn)
            self._close(conn)
            return
        self._advance(conn)

    def _advance(self, conn: DoorConnection) -> None:
        """Decide once the head is in, hand on once the body is in."""
        if conn.head is None:
            line_end = conn.inbox.find(b"\r\n")
            line_length = len(conn.inbox) if line_end < 0 else line_end
            if line_length > self.cfg.limit_request_line > 0:  # gunicorn would answer in plain text
                self._refuse(conn, 414, f"The request line is over {self.cfg.limit_request_line} bytes; "
                                        "send long parameters (such as labels=) as POST form fields")
                return
            end = conn.inbox.find(b"\r\n\r\n")
            if end < 0:
                if len(conn.inbox) > HEAD_LIMIT:
                    self._refuse(conn, 431, f"The request line and headers exceed {HEAD_LIMIT} bytes")
                return
            try:
                conn.head = parse_head(bytes(conn.inbox[:end + 4]))
            except ValueError:
                self._hand_on(conn, light=True)  # gunicorn's parser answers it with a 400
                return
            if not self._admissible_head(conn):
                return
        head = conn.head
        if head.chunked or len(conn.inbox) - head.size >= head.content_length:
            self._hand_on(conn, light=is_light(head))

    def _admissible_head(self, conn: DoorConnection) -> bool:
        head = conn.head
        if head.chunked and not is_light(head):
            self._refuse(conn, 411, "Send the request with a Content-Length (chunked uploads are "
                                    "not accepted)")
            return False
        limit = self.body_limits.for_request(head.path, head.media_type)
        if head.content_length > limit:
            self._refuse(conn, 413, f"The request body is {head.content_length} bytes; the limit is "
                                    f"{limit} ({self.body_limits.described(head.path, head.media_type)})")
            return False
        if head.content_length and self.buffered + head.content_length > self.buffer_limit:
            self._refuse(conn, 503, "The service is receiving too many uploads at once; retry "
                                    "shortly", retry_after=1)
            return False
        if head.expect_line is not None:
            # Answer the client's "may I send the body?" here, and keep gunicorn from answering again.
            start, end = head.expect_line
            del conn.inbox[start:end]
            self.buffered -= end - start
            conn.head = dataclasses.replace(head, size=head.size - (end - start), expect_line=None)
            self._send_quietly(conn.sock, b"HTTP/1.1 100 Continue\r\n\r\n")
        return True

    def _hand_on(self, conn: DoorConnection, light: bool) -> None:
        self._forget(conn)
        if not light:
            if self.heavy_in_flight >= self.max_queue:
                self._refuse(conn, 503, f"The service is busy ({self.heavy_in_flight} requests in "
                                        f"progress, MAX_QUEUE={self.max_queue}); retry shortly",
                             retry_after=1)
                return
            self.heavy_in_flight += 1
            conn.heavy = True
        pool = self.light_pool if light else self.tpool
        future = pool.submit(self.handle, conn)
        future.add_done_callback(lambda done: self.method_queue.defer(self.finish_request, conn, done))

    def finish_request(self, conn, fs):
        if getattr(conn, "heavy", False):
            self.heavy_in_flight -= 1
            conn.heavy = False
        super().finish_request(conn, fs)

    def _forget(self, conn: DoorConnection) -> None:
        """Stop reading this connection in the event loop (it is handed on or closed); `buffered`
        counts the inboxes of the connections being read, so forgetting twice changes nothing."""
        if conn in self.reading:
            del self.reading[conn]
            self.poller.unregister(conn.sock)
            self.buffered -= len(conn.inbox)

    def _refuse(self, conn: DoorConnection, status: int, message: str,
                retry_after: int | None = None) -> None:
        self._forget(conn)
        conn.inbox = bytearray()
        self._send_quietly(conn.sock, error_answer(status, message, time.monotonic() - conn.arrived,
                                                   retry_after))
        self.nr_conns -= 1
        self._linger(conn.sock)

    def _linger(self, sock: socket.socket) -> None:
        """Close after the answer, the event loop draining what the client still sends (so that it
        reads the answer instead of a reset) for at most LINGER_SECONDS: never blocking the loop, as
        gunicorn's own graceful close would while a client keeps its socket open."""
        try:
            sock.setblocking(False)
            sock.shutdown(socket.SHUT_WR)
            self.lingering[sock] = time.monotonic() + LINGER_SECONDS
            self.poller.register(sock, selectors.EVENT_READ, self._drain)
        except (OSError, ValueError, KeyError):
            sock.close()

    def _drain(self, sock: socket.socket) -> None:
        try:
            while sock.recv(READ_CHUNK):
                pass
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._stop_lingering(sock)

    def _stop_lingering(self, sock: socket.socket) -> None:
        self.lingering.pop(sock, None)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.poller.unregister(sock)
        sock.close()

    def _close(self, conn: DoorConnection) -> None:
        self.nr_conns -= 1
        conn.close()

    @staticmethod
    def _send_quietly(sock: socket.socket, data: bytes) -> None:
        """A short answer fits the socket's buffer; a client that cannot take it loses it."""
        with contextlib.suppress(OSError):
            sock.send(data)

    def murder_pending(self):
        """Every loop turn: end requests still arriving at their deadline, and finished lingers."""
        super().murder_pending()
        now = time.monotonic()
        for conn in list(self.reading):
            if not self.alive:
                self._forget(conn)
                self._close(conn)
            elif now >= conn.deadline:
                self._refuse(conn, 408, f"The request did not arrive within REQUEST_TIMEOUT="
                                        f"{self.request_timeout:g} s")
        for sock, close_at in list(self.lingering.items()):
            if now >= close_at or not self.alive:
                self._stop_lingering(sock)

    # --- a pool thread's side ---

    def handle(self, conn: DoorConnection):
        """Give gunicorn's parser the bytes the door read, then serve as gthread does."""
        _thread.arrived = conn.arrived
        conn.data_ready = True
        conn.sock.setblocking(True)
        conn.init()
        conn.parser.unreader.unread(bytes(conn.inbox))
        conn.inbox = bytearray()
        return super().handle(conn)


def door_limits(max_queue: int, request_timeout: float, body_limits: BodyLimits, threads: int) -> None:
    """Configure the worker class from the validated settings (gunicorn.conf.py, before forking)."""
    FrontDoorWorker.max_queue = max_queue
    FrontDoorWorker.request_timeout = request_timeout
    FrontDoorWorker.body_limits = body_limits
    # Bodies held at once: every place in the queue and every thread, each with a whole upload, and
    # always room for one body of many images.
    FrontDoorWorker.buffer_limit = max((max_queue + threads) * body_limits.one_image,
                                       body_limits.many_images)
