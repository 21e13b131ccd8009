"""Flask's test client's calls, sent to a real server (CLIP.sh) as raw HTTP/1.1 over loopback: the
same hostile cases run through the app in-process and through the front door and gunicorn.

Requests are built by werkzeug's EnvironBuilder exactly as the test client builds them (query strings,
forms, files, raw QUERY_STRING overrides), written as bytes, and the answer read by http.client.
"""

from __future__ import annotations

import http.client
import json
import socket

from werkzeug.test import EnvironBuilder

HOP_BY_HOP = {"HTTP_HOST", "HTTP_CONTENT_LENGTH", "HTTP_CONTENT_TYPE"}


class LiveResponse:
    """The parts of Flask's test response the tests read."""

    def __init__(self, status: int, headers: http.client.HTTPMessage, data: bytes):
        self.status_code = status
        self.headers = headers
        self.data = data
        self.mimetype = (headers.get("Content-Type") or "").partition(";")[0]

    def get_json(self, silent: bool = False):
        try:
            return json.loads(self.data)
        except ValueError:
            if silent:
                return None
            raise

    @property
    def json(self):
        return self.get_json()

    def get_data(self, as_text: bool = False):
        return self.data.decode() if as_text else self.data


class LiveClient:
    """`get`, `post`, `open` and friends, as Flask's test client takes them, against 127.0.0.1:port."""

    def __init__(self, port: int, timeout: float = 30):
        self.port = port
        self.timeout = timeout

    def open(self, path: str = "/", method: str = "GET", environ_overrides: dict | None = None,
             follow_redirects: bool = False, **kwargs) -> LiveResponse:
        builder = EnvironBuilder(path=path, method=method, **kwargs)
        try:
            environ = builder.get_environ()
        finally:
            builder.close()
        environ.update(environ_overrides or {})
        body = environ["wsgi.input"].read()
        target = environ["PATH_INFO"].encode("latin-1")
        if environ.get("QUERY_STRING"):
            target += b"?" + environ["QUERY_STRING"].encode("latin-1")
        lines = [environ["REQUEST_METHOD"].encode() + b" " + target + b" HTTP/1.1", b"Host: localhost",
                 b"Connection: close", b"Content-Length: %d" % len(body)]
        if environ.get("CONTENT_TYPE"):
            lines.append(b"Content-Type: " + environ["CONTENT_TYPE"].encode("latin-1"))
        for key, value in environ.items():
            if key.startswith("HTTP_") and key not in HOP_BY_HOP:
                name = key[5:].replace("_", "-").title().encode()
                lines.append(name + b": " + str(value).encode("latin-1"))
        with socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout) as sock:
            sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + body)
            answer = http.client.HTTPResponse(sock, method=environ["REQUEST_METHOD"])
            answer.begin()
            return LiveResponse(answer.status, answer.headers, answer.read())

    def get(self, path: str = "/", **kwargs) -> LiveResponse:
        return self.open(path, method="GET", **kwargs)

    def post(self, path: str = "/", **kwargs) -> LiveResponse:
        return self.open(path, method="POST", **kwargs)

    def put(self, path: str = "/", **kwargs) -> LiveResponse:
        return self.open(path, method="PUT", **kwargs)

    def delete(self, path: str = "/", **kwargs) -> LiveResponse:
        return self.open(path, method="DELETE", **kwargs)

    def patch(self, path: str = "/", **kwargs) -> LiveResponse:
        return self.open(path, method="PATCH", **kwargs)

    def head(self, path: str = "/", **kwargs) -> LiveResponse:
        return self.open(path, method="HEAD", **kwargs)

    def options(self, path: str = "/", **kwargs) -> LiveResponse:
        return self.open(path, method="OPTIONS", **kwargs)
