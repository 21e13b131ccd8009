"""Logging: text or JSON lines, and one line per request.

The request line names the input kind (upload, url, file), never the URL or path itself: URLs can
carry credentials and paths can be private. Image bytes are never logged.
"""

from __future__ import annotations

import json
import logging
import time

from flask import Flask, g, request

from clip_service import metrics

request_log = logging.getLogger("clip_service.requests")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per line, with a request's fields at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, log_format: str) -> None:
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    formatter = JsonLinesFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    for handler in root.handlers:
        handler.setFormatter(formatter)
    # open_clip logs its every step on the root logger at INFO; only ours follow LOG_LEVEL.
    logging.getLogger("clip_service").setLevel(level)


def set_input_kind(kind: str) -> None:
    g.input_kind = kind


def request_seconds() -> float:
    """Seconds since the request started: the answers' processing_time and the log's duration."""
    return time.perf_counter() - g.get("request_started", time.perf_counter())


def install_request_logging(app: Flask) -> None:
    """Start each request's clock (install before the routes, so every hook runs inside it) and log it."""

    @app.before_request
    def _start():
        g.request_started = time.perf_counter()

    @app.after_request
    def _log(response):
        duration = request_seconds()
        route = request.url_rule.rule if request.url_rule else "unmatched"
        kind = g.get("input_kind", "none")
        metrics.REQUESTS.labels(route, kind, str(response.status_code)).inc()
        if route == "/analyze":
            metrics.STAGE_SECONDS.labels("total").observe(duration)
        fields = {"method": request.method, "route": route, "input": kind,
                  "status": response.status_code, "duration_ms": round(duration * 1000, 1),
                  "client": request.remote_addr}
        request_log.info("%s %s input=%s status=%d %.1f ms client=%s", request.method, route, kind,
                         response.status_code, duration * 1000, request.remote_addr,
                         extra={"fields": fields})
        return response
