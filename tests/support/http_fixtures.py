"""Small HTTP servers on 127.0.0.1 that tests control: an image host, an emoji API, the app itself.

Each serves from a daemon thread and is stopped with stop_http (or close()), so a failing test never
leaves a listener behind for the next one.
"""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from werkzeug.serving import BaseWSGIServer, make_server


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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


def serve_http(handler: type[BaseHTTPRequestHandler], port: int = 0, backlog: int = 5) -> ThreadingHTTPServer:
    """A threaded HTTP server on 127.0.0.1, serving in a daemon thread; stop it with stop_http.

    `backlog`: connections the kernel queues before the server accepts them; a test whose clients
    all connect at once needs one per client.
    """

    class Server(ThreadingHTTPServer):
        allow_reuse_address = True
        daemon_threads = True
        request_queue_size = backlog

    server = Server(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def stop_http(server: ThreadingHTTPServer | BaseWSGIServer) -> None:
    server.shutdown()
    server.server_close()


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


def serve_app(app) -> BaseWSGIServer:
    """The Flask app on a loopback port (werkzeug's threaded server), for a browser; stop with stop_http."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
