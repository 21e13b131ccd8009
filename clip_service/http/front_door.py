"""gunicorn's threaded worker behind a front door: the event loop frames, reads and answers; threads
only compute.

gthread hands every connection to one of THREADS threads, which then reads the request and writes the
answer with blocking calls: a client dripping its request or never reading its answer holds a thread
for as long as it likes. Here the worker's event loop does all the talking to clients, without
blocking:
- requests are framed by one well-kept parser, h11, under a deadline counted from the request's
  arrival; whatever h11 (or the door's limits) refuses is answered here with the service's JSON error
  shape, before any thread;
- a thread gets a request only when its head and whole body are in memory, rendered again by the door
  from what h11 parsed (one Content-Length, no Expect, no leading blank line), so gunicorn's parser,
  which builds the WSGI environ, can never disagree with the door on where a request starts and ends;
- the answer is written into memory by the thread, which sends what the socket takes at once without
  waiting; the event loop sends the rest, and drops a client that has not taken it within
  REQUEST_TIMEOUT;
- light routes without a body (/health, the page, CORS preflights: http/routes.py) go to a small pool
  of their own, so they answer under any load; every other request takes one of at most MAX_QUEUE
  places, or gets a 503 with Retry-After at once.
The arrival time travels to the app in the WSGI environ (ARRIVED_KEY), so REQUEST_TIMEOUT counts from
the moment the first byte arrived, not from when a thread became free.
"""

from __future__ import annotations

import contextlib
import errno
import json
import re
import resource
import selectors
import signal
import socket
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from urllib.parse import unquote, urlsplit

import h11
from gunicorn import http
from gunicorn.workers import gthread

from clip_service.errors import DeadlineExceeded
from clip_service.http.limits import BodyLimits
from clip_service.http.routes import ARRIVED_KEY, is_light, is_probe

LIGHT_THREADS = 2
HEAD_LIMIT = 64 * 1024  # request line and headers together
READ_CHUNK = 256 * 1024  # the most one recv() takes of a body (and what a thread's parser copies at once)
READ_PER_EVENT = 4 * 1024 * 1024  # one fast upload must not keep the event loop from the others
LINGER_SECONDS = 2.0  # after a refusal, how long unread request bytes are drained before closing
ACCEPT_PAUSE_SECONDS = 0.5  # out of descriptors: stop accepting this long, instead of ending the worker
FD_RESERVE = 64  # descriptors kept for the model's files, logs, pipes and lingering sockets
OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
HTTP_VERSIONS = (b"1.0", b"1.1")
BARE_LF = re.compile(rb"(?<!\r)\n")
TARGET_BYTES = re.compile(rb"[^\x20-\x7e]")  # what a request line may not hold, raw
CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # no field value holds these (RFC 9110, 5.5)

_thread = threading.local()


@dataclass(frozen=True)
class Head:
    """What the door needs to know of a request before its body."""

    method: str
    path: str  # as the app sees it (PATH_INFO): percent-decoded, without the query or scheme and host
    content_length: int
    chunked: bool
    expects_continue: bool  # an HTTP/1.1 `Expect: 100-continue`
    media_type: str = ""  # Content-Type without parameters, lower case: sizes the body (http/limits.py)

    @property
    def has_body(self) -> bool:
        return self.chunked or self.content_length > 0


class Refusal(Exception):
    """A request the door answers itself, with `status` and a message in the service's error shape."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def request_path(target: str) -> str:
    """The path the app will route by, as gunicorn makes PATH_INFO of a request target."""
    path = urlsplit(target).path if "://" in target else target.partition("?")[0].partition("#")[0]
    return unquote(path, encoding="latin-1")


def head_of(event: h11.Request, expects_continue: bool) -> Head:
    """h11's parsed request line and headers -> Head; Refusal for what the door does not take."""
    if event.http_version not in HTTP_VERSIONS:
        raise Refusal(400, f"HTTP/{event.http_version.decode('latin-1')} is not spoken here; "
                           "send HTTP/1.1")
    lengths = [value for name, value in event.headers if name == b"content-length"]  # h11: one at most
    chunked = any(name == b"transfer-encoding" for name, _ in event.headers)
    if chunked and lengths:
        raise Refusal(400, "Send either Content-Length or Transfer-Encoding, not both")
    media_type = next((value.partition(b";")[0].strip().lower().decode("latin-1")
                       for name, value in event.headers if name == b"content-type"), "")
    return Head(event.method.decode("latin-1"), request_path(event.target.decode("latin-1")),
                int(lengths[0]) if lengths else 0, chunked, expects_continue, media_type)


def rendered_head(event: h11.Request) -> bytes:
    """The request line and headers as gunicorn's parser is given them: h11's reading, in one canonical
    form (CRLF lines, one Content-Length, no Expect: the door has answered it)."""
    lines = [b"%s %s HTTP/%s" % (event.method, event.target, event.http_version)]
    lines += [name + b": " + value for name, value in event.headers.raw_items()
              if name.lower() != b"expect"]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def parse_head(data: bytes) -> Head:
    """A whole request head -> Head, read by h11 as the door reads it; ValueError if it is refused."""
    parser = h11.Connection(h11.SERVER, max_incomplete_event_size=HEAD_LIMIT)
    parser.receive_data(data)
    try:
        event = parser.next_event()
        if not isinstance(event, h11.Request):
            raise ValueError("not a whole request head")
        return head_of(event, parser.they_are_waiting_for_100_continue)
    except (h11.RemoteProtocolError, Refusal) as error:
        raise ValueError(str(error)) from None


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


class Answer:
    """The socket a thread's gunicorn writes its answer to: memory, sent later by the event loop.

    A thread never touches the client's socket, so a client that does not read holds no thread."""

    def __init__(self):
        self.parts: list[bytes] = []

    def sendall(self, data) -> None:
        self.parts.append(bytes(data))

    def send(self, data) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def sendfile(self, file, offset: int = 0, count: int | None = None) -> int:
        file.seek(offset)
        data = file.read(count) if count else file.read()
        self.parts.append(data)
        return len(data)

    def gettimeout(self) -> float:
        return 0.0

    def setblocking(self, flag) -> None:
        pass

    def settimeout(self, value) -> None:
        pass

    def recv(self, size: int) -> bytes:
        return b""

    def shutdown(self, how) -> None:
        pass

    def close(self) -> None:
        pass

    def getvalue(self) -> bytes:
        return b"".join(self.parts)


@dataclass
class Exchange:
    """What gunicorn's handle_request needs of a connection: the answer's socket and the addresses."""

    sock: Answer
    client: object
    server: object


class DoorConnection(gthread.TConn):
    """A connection with what the door has read of its current request, or has still to send."""

    def __init__(self, cfg, sock, client, server, linger=None):
        super().__init__(cfg, sock, client, server)
        self.arrived = self.deadline = 0.0
        self.parser: h11.Connection | None = None
        self.inbox = bytearray()  # the head's raw bytes until h11 has read it (the 414 and LF checks)
        self.held = 0  # bytes of this request the door holds, counted in the worker's `buffered`
        self.request: list[bytes] = []  # the rendered head, then the body as it arrived
        self.body_received = 0
        self.head: Head | None = None
        self.leftover = b""  # bytes pipelined behind the request
        self.heavy = False
        self.outbox = memoryview(b"")
        self.keep_alive = False
        self.write_registered = False

    def begin(self, pending: bytes, timeout: float) -> None:
        self.arrived = time.monotonic()
        self.deadline = self.arrived + timeout
        self.parser = h11.Connection(h11.SERVER, max_incomplete_event_size=HEAD_LIMIT)
        self.inbox = bytearray()
        self.held = 0
        self.request = []
        self.body_received = 0
        self.head = None
        self.leftover = b""
        self.heavy = False

    def close(self, graceful: bool = False) -> None:
        gthread.util.close(self.sock)


class DeadlineInput:
    """wsgi.input that fails a read past the request's deadline: a large multipart body is parsed in
    many reads, and none of them may take the request past REQUEST_TIMEOUT."""

    def __init__(self, stream, deadline: float):
        self.stream = stream
        self.deadline = deadline

    def _check(self) -> None:
        if time.monotonic() > self.deadline:
            raise DeadlineExceeded("Reading the request body took past REQUEST_TIMEOUT; send a smaller "
                                   "body or retry later")

    def read(self, size: int = -1) -> bytes:
        self._check()
        return self.stream.read(size)

    def readline(self, size: int = -1) -> bytes:
        self._check()
        return self.stream.readline(size)

    def __iter__(self):
        return iter(self.readline, b"")


class StampArrival:
    """WSGI wrapper: puts the door's arrival time into the environ and the deadline on the body's
    reads; otherwise the app itself."""

    def __init__(self, app, request_timeout: float):
        self.app = app
        self.request_timeout = request_timeout

    def __call__(self, environ, start_response):
        arrived = getattr(_thread, "arrived", None)
        environ[ARRIVED_KEY] = arrived
        if arrived is not None:
            environ["wsgi.input"] = DeadlineInput(environ["wsgi.input"], arrived + self.request_timeout)
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
        self.writing: dict[DoorConnection, float] = {}  # answers being sent -> when the client is dropped
        self.lingering: dict[socket.socket, float] = {}  # refused sockets being drained -> close time
        self.heavy_in_flight = 0
        self.buffered = 0
        self.accept_paused_until = 0.0
        self.light_pool: futures.ThreadPoolExecutor | None = None
        self.probe_pool: futures.ThreadPoolExecutor | None = None

    def init_process(self):
        self.light_pool = futures.ThreadPoolExecutor(LIGHT_THREADS, thread_name_prefix="clip-light")
        self.probe_pool = futures.ThreadPoolExecutor(1, thread_name_prefix="clip-probe")
        # Descriptors are a budget: stop accepting before the process runs out of them.
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY:
            self.worker_connections = max(1, min(self.worker_connections, soft - FD_RESERVE))
        super().init_process()

    def init_signals(self):
        super().init_signals()
        # SIGHUP asks for a reload here (gunicorn.conf.py's post_worker_init installs it once the app is
        # loaded); gunicorn leaves it at the default, which would end a worker still starting up
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def load_wsgi(self):
        super().load_wsgi()
        self.wsgi = StampArrival(self.wsgi, self.request_timeout)

    # --- the event loop's side: accept, read, decide, hand on, answer ---

    def set_accept_enabled(self, enabled):
        now = time.monotonic()
        if enabled and now < self.accept_paused_until:
            return
        if not enabled and now >= self.accept_paused_until and self._evictable():
            return  # at the connection cap a new client takes the place of an idle or slow one
        super().set_accept_enabled(enabled)

    def accept(self, listener):
        try:
            sock, client = listener.accept()
        except OSError as error:
            if error.errno in OUT_OF_DESCRIPTORS:
                # gthread re-raises, which ends the worker (and reloads the model); waiting for
                # connections to close frees descriptors instead.
                self.log.warning("Out of file descriptors (%s, %d connections): not accepting for "
                                 "%.1f s", errno.errorcode.get(error.errno, error.errno), self.nr_conns,
                                 ACCEPT_PAUSE_SECONDS)
                self.accept_paused_until = time.monotonic() + ACCEPT_PAUSE_SECONDS
                super().set_accept_enabled(False)
                return
            if error.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        if self.nr_conns >= self.worker_connections and not self._evict():
            gthread.util.close(sock)  # every connection is in a thread: nothing can make room
            return
        self.nr_conns += 1
        self._start_reading(DoorConnection(self.cfg, sock, client, listener.getsockname()), b"")

    def _evictable(self) -> bool:
        return bool(self.lingering or self.keepalived_conns or self.writing or self.reading)

    def _evict(self) -> bool:
        """Close the oldest connection no thread is serving, preferring those that cost the least to
        lose: a refused one lingering, an idle kept-alive one, an unread answer, a request arriving."""
        if self.lingering:
            self._stop_lingering(next(iter(self.lingering)))
        elif self.keepalived_conns:
            conn = self.keepalived_conns.popleft()
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.poller.unregister(conn.sock)
            self._close(conn)
        elif self.writing:
            conn = next(iter(self.writing))
            self._stop_writing(conn)
            self._close(conn)
        elif self.reading:
            conn = next(iter(self.reading))
            self._forget(conn)
            self._send_quietly(conn.sock, error_answer(503, "The service has too many connections "
                                                            "open; retry shortly", 0.0, retry_after=1))
            self._close(conn)
        else:
            return False
        return True

    def on_client_socket_readable(self, conn, client):
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._start_reading(conn, b"")

    def _start_reading(self, conn: DoorConnection, pending: bytes) -> None:
        conn.sock.setblocking(False)
        conn.begin(pending, self.request_timeout)
        self.reading[conn] = None
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))
        if pending:
            self._receive(conn, pending)
            self._advance(conn)

    def _receive(self, conn: DoorConnection, chunk: bytes) -> None:
        conn.parser.receive_data(chunk)
        if conn.head is None:
            conn.inbox += chunk
        conn.held += len(chunk)
        self.buffered += len(chunk)

    def _wanted(self, conn: DoorConnection) -> int:
        """How much to recv: a head's worth, or what is left of the body; never much of what a
        client pipelines behind it, which waits in the kernel until the answer is sent."""
        if conn.head is None:
            return HEAD_LIMIT
        received = conn.body_received + len(conn.parser.trailing_data[0])
        return max(1, min(READ_CHUNK, conn.head.content_length - received))

    def _on_readable(self, conn: DoorConnection, _sock) -> None:
        received = 0
        try:
            while received < READ_PER_EVENT and conn in self.reading:
                chunk = conn.sock.recv(self._wanted(conn))
                if not chunk:  # the client went away
                    self._forget(conn)
                    self._close(conn)
                    return
                received += len(chunk)
                self._receive(conn, chunk)
                self._advance(conn)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._forget(conn)
            self._close(conn)

    def _advance(self, conn: DoorConnection) -> None:
        """Take h11's events: decide once the head is in, hand on once the body is in."""
        try:
            while conn in self.reading:
                if conn.head is None:
                    self._check_head_size(conn.inbox)
                event = conn.parser.next_event()
                if event is h11.NEED_DATA:
                    return
                if isinstance(event, h11.Request):
                    self._on_head(conn, event)
                elif isinstance(event, h11.Data):
                    conn.request.append(bytes(event.data))
                    conn.body_received += len(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    conn.leftover = bytes(conn.parser.trailing_data[0])
                    self._hand_on(conn, light=is_light(conn.head.method, conn.head.path)
                                  and not conn.head.has_body)
                    return
                else:  # PAUSED or ConnectionClosed cannot come before the end of a request
                    return
        except h11.RemoteProtocolError as error:
            if error.error_status_hint == 431:
                self._refuse(conn, 431, f"The request line and headers exceed {HEAD_LIMIT} bytes")
            elif error.error_status_hint == 501:
                self._refuse(conn, 501, "That Transfer-Encoding is not supported; send the request with a "
                                        "Content-Length")
            elif conn.head is None and TARGET_BYTES.search(conn.inbox.partition(b"\n")[0].rstrip(b"\r")):
                self._refuse(conn, 400, "The request line holds bytes that are not printable ASCII; "
                                        "percent-encode the values as UTF-8 (e.g. curl -G --data-urlencode)")
            else:
                self._refuse(conn, 400, f"The request could not be parsed as HTTP/1.1 ({error}); "
                                        "send a well-formed request")
        except Refusal as refusal:
            self._refuse(conn, refusal.status, refusal.message)

    def _check_head_size(self, received: bytes) -> None:
        """A request line past gunicorn's limit, or a head past HEAD_LIMIT, is refused before h11 reads
        it (h11 would wait for the rest of a long head, and then judge it by other faults)."""
        if len(received.partition(b"\n")[0]) > self.cfg.limit_request_line > 0:
            raise Refusal(414, f"The request line is over {self.cfg.limit_request_line} bytes; send "
                               "long parameters (such as labels=) as POST form fields")
        ends = [end for end in (received.find(b"\n\r\n"), received.find(b"\n\n")) if end >= 0]
        if (min(ends) if ends else len(received)) > HEAD_LIMIT:
            raise Refusal(431, f"The request line and headers exceed {HEAD_LIMIT} bytes")

    def _on_head(self, conn: DoorConnection, event: h11.Request) -> None:
        raw = bytes(conn.inbox[:len(conn.inbox) - len(conn.parser.trailing_data[0])])
        conn.inbox = bytearray()
        if BARE_LF.search(raw):
            raise Refusal(400, "End every line of the request head with CRLF")
        if re.search(rb"\n[ \t]", raw):
            raise Refusal(400, "A header line starts with white space (obsolete line folding); "
                               "send each header on one line")
        if not 3 <= len(event.method) <= 20 or re.search(rb"[a-z#]", event.method):  # gunicorn's rule
            raise Refusal(400, f"{event.method[:20].decode('latin-1')!r} is not a method this service "
                               "takes; use GET, POST or OPTIONS")
        if any(CONTROL.search(value) for _, value in event.headers):  # h11 lets them through
            raise Refusal(400, "A header value holds a control character; send printable text")
        if len(event.headers) > self.cfg.limit_request_fields:
            raise Refusal(431, f"The request has over {self.cfg.limit_request_fields} headers")
        longest = max((len(name) + len(value) + 2 for name, value in event.headers), default=0)
        if longest > self.cfg.limit_request_field_size > 0:
            raise Refusal(431, f"A header is over {self.cfg.limit_request_field_size} bytes")
        head = conn.head = head_of(event, conn.parser.they_are_waiting_for_100_continue)
        if head.chunked:
            raise Refusal(411, "Send the request with a Content-Length (chunked uploads are not accepted)")
        limit = self.body_limits.for_request(head.path, head.media_type)
        if head.content_length > limit:
            raise Refusal(413, f"The request body is {head.content_length} bytes; the limit is {limit} "
                               f"({self.body_limits.described(head.path, head.media_type)})")
        if head.content_length and self.buffered + head.content_length > self.buffer_limit:
            self._refuse(conn, 503, "The service is receiving too many uploads at once; retry shortly",
                         retry_after=1)
            return
        conn.request.append(rendered_head(event))
        if head.expects_continue:  # answer "may I send the body?" here; gunicorn never sees the Expect
            self._send_quietly(conn.sock, b"HTTP/1.1 100 Continue\r\n\r\n")

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
        if not light:
            pool = self.tpool
        elif is_probe(conn.head.method, conn.head.path) and self.probe_pool is not None:
            pool = self.probe_pool
        else:
            pool = self.light_pool
        future = pool.submit(self.handle, conn)
        future.add_done_callback(lambda done: self.method_queue.defer(self.finish_request, conn, done))

    def finish_request(self, conn, fs):
        """The thread's answer is in memory: send it from here, then read the next request."""
        if getattr(conn, "heavy", False):
            self.heavy_in_flight -= 1
            conn.heavy = False
        try:
            keep_alive, answer, sent = fs.result()
        except Exception:  # noqa: BLE001 - handle() answers every failure; this is the last resort
            keep_alive, answer, sent = False, b"", 0
        conn.request = []
        if not answer:
            self._close(conn)
            return
        conn.outbox = memoryview(answer)[sent:]
        conn.keep_alive = keep_alive and self.alive
        self.writing[conn] = time.monotonic() + self.request_timeout
        self._on_writable(conn)

    def _on_writable(self, conn: DoorConnection, _sock=None) -> None:
        try:
            while conn.outbox:
                sent = conn.sock.send(conn.outbox[:READ_PER_EVENT])
                conn.outbox = conn.outbox[sent:]
        except (BlockingIOError, InterruptedError):
            if not conn.write_registered:
                self.poller.register(conn.sock, selectors.EVENT_WRITE, partial(self._on_writable, conn))
                conn.write_registered = True
            return
        except OSError:
            self._stop_writing(conn)
            self._close(conn)
            return
        self._stop_writing(conn)
        if not conn.keep_alive:
            self._linger(conn.sock)
        elif conn.leftover:
            self._start_reading(conn, conn.leftover)
        else:
            conn.set_timeout()
            self.keepalived_conns.append(conn)
            self.poller.register(conn.sock, selectors.EVENT_READ,
                                 partial(self.on_client_socket_readable, conn))

    def _stop_writing(self, conn: DoorConnection) -> None:
        self.writing.pop(conn, None)
        conn.outbox = memoryview(b"")
        if conn.write_registered:
            conn.write_registered = False
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.poller.unregister(conn.sock)

    def _forget(self, conn: DoorConnection) -> None:
        """Stop reading this connection in the event loop (it is handed on or closed); `buffered`
        counts the bytes of the requests being read, so forgetting twice changes nothing."""
        if conn in self.reading:
            del self.reading[conn]
            self.poller.unregister(conn.sock)
            self.buffered -= conn.held

    def _refuse(self, conn: DoorConnection, status: int, message: str,
                retry_after: int | None = None) -> None:
        self._forget(conn)
        conn.inbox, conn.request = bytearray(), []
        self._send_quietly(conn.sock, error_answer(status, message, time.monotonic() - conn.arrived,
                                                   retry_after))
        self._linger(conn.sock)

    def _linger(self, sock: socket.socket) -> None:
        """Close after the answer, the event loop draining what the client still sends (so that it
        reads the answer instead of a reset) for at most LINGER_SECONDS: never blocking the loop, as
        gunicorn's own graceful close would while a client keeps its socket open. A lingering socket
        still holds a descriptor: it counts in nr_conns until it is closed."""
        try:
            sock.setblocking(False)
            sock.shutdown(socket.SHUT_WR)
            self.poller.register(sock, selectors.EVENT_READ, self._drain)
            self.lingering[sock] = time.monotonic() + LINGER_SECONDS
        except (OSError, ValueError, KeyError):
            sock.close()
            self.nr_conns -= 1

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
        if self.lingering.pop(sock, None) is not None:
            self.nr_conns -= 1
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
        """Every loop turn: end requests still arriving and answers still unsent at their deadline,
        and finished lingers."""
        super().murder_pending()
        now = time.monotonic()
        for conn in list(self.reading):
            if not self.alive:
                self._forget(conn)
                self._close(conn)
            elif now >= conn.deadline:
                self._refuse(conn, 408, f"The request did not arrive within REQUEST_TIMEOUT="
                                        f"{self.request_timeout:g} s")
        for conn, drop_at in list(self.writing.items()):
            if now >= drop_at:  # a client that does not read its answer loses it
                self._stop_writing(conn)
                self._close(conn)
        for sock, close_at in list(self.lingering.items()):
            if now >= close_at or not self.alive:
                self._stop_lingering(sock)

    # --- a pool thread's side: gunicorn's parser and the app, on bytes in memory ---

    def handle(self, conn: DoorConnection) -> tuple[bool, bytes, int]:
        """Serve the request the door read; (keep the connection alive?, the whole answer, how much of
        it is sent). The thread sends what the socket takes at once, never waiting (the socket is
        non-blocking): the event loop sends the rest, so a busy loop does not delay a short answer."""
        _thread.arrived = conn.arrived
        answer = Answer()
        # The body in the pieces it arrived in: gunicorn's reader copies at most one piece per read.
        parser = http.get_parser(self.cfg, iter(conn.request), conn.client)
        req = None
        try:
            req = next(parser)
            keep_alive = bool(self.handle_request(req, Exchange(answer, conn.client, conn.server)))
        except StopIteration:
            keep_alive = False
        except Exception as error:  # noqa: BLE001 - gunicorn's own rule: every failure gets an answer
            self.handle_error(req, answer, conn.client, error)
            keep_alive = False
        data, sent = answer.getvalue(), 0
        with contextlib.suppress(OSError):  # full (BlockingIOError) or gone: the event loop sees to it
            sent = conn.sock.send(data)
        return keep_alive, data, sent

    def handle_error(self, req, client, addr, exc):
        """gunicorn's answer to a request it could not parse or serve, in the service's error shape."""
        staged = Answer()
        super().handle_error(req, staged, addr, exc)
        status_line = staged.getvalue().partition(b"\r\n")[0].split(b" ")
        status = int(status_line[1]) if len(status_line) > 1 and status_line[1].isdigit() else 500
        message = ("The request could not be parsed; send a well-formed HTTP/1.1 request" if status < 500
                   else "The service failed on this request; see its log")
        client.sendall(error_answer(status, message, 0.0))


def door_limits(max_queue: int, request_timeout: float, body_limits: BodyLimits, threads: int) -> None:
    """Configure the worker class from the validated settings (gunicorn.conf.py, before forking)."""
    FrontDoorWorker.max_queue = max_queue
    FrontDoorWorker.request_timeout = request_timeout
    FrontDoorWorker.body_limits = body_limits
    # Bodies held at once: every place in the queue and every thread, each with a whole upload, and
    # always room for one body of many images.
    FrontDoorWorker.buffer_limit = max((max_queue + threads) * body_limits.one_image,
                                       body_limits.many_images)
