"""The Flask app factory."""

from __future__ import annotations

import io

from flask import Flask, Request
from werkzeug.middleware.proxy_fix import ProxyFix

from clip_service.access import install_access_control
from clip_service.logs import configure_logging, install_request_logging
from clip_service.model import ClipEngine
from clip_service.openapi import openapi_bp
from clip_service.routes import bp
from clip_service.service import ClipService
from clip_service.settings import Settings
from clip_service.web import web_bp

MULTIPART_OVERHEAD = 64 * 1024


class InMemoryRequest(Request):
    """Keeps uploads in memory (never spooled to disk); MAX_CONTENT_LENGTH bounds their size."""

    def _get_file_stream(self, total_content_length, content_type, filename=None,
                         content_length=None):
        return io.BytesIO()


def create_app(settings: Settings, engine: ClipEngine | None = None) -> Flask:
    """A ready-to-serve app; the model (unless `engine` is given) loads in the background."""
    configure_logging(settings.log_level, settings.log_format)
    app = Flask(__name__, static_folder=None)  # the page is served by web.py, with its headers
    app.request_class = InMemoryRequest
    app.config["MAX_CONTENT_LENGTH"] = settings.max_image_bytes + MULTIPART_OVERHEAD
    app.json.ensure_ascii = False  # emoji as characters, not \u escapes
    app.json.sort_keys = False
    service = ClipService(settings, engine=engine)
    app.extensions["clip_service"] = service
    install_request_logging(app)  # first: its clock must start before any other hook runs
    app.register_blueprint(bp)
    install_access_control(app, settings.api_key, settings.cors_origins, settings.answered_hosts)
    app.register_blueprint(web_bp)
    if settings.trusted_proxies:  # behind nginx: log and rate the real client, not the proxy
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxies)
    app.register_blueprint(openapi_bp)
    service.start()
    return app
