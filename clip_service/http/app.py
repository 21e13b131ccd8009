"""The Flask app factory: settings in, a ready-to-serve app out (the model loads in the background)."""

from __future__ import annotations

import io

from flask import Flask, Request, request
from werkzeug.middleware.proxy_fix import ProxyFix

from clip_service.engines.base import Engine
from clip_service.http.access import install_access_control
from clip_service.http.analyze import analyze_bp
from clip_service.http.current import EXTENSION
from clip_service.http.embed import embed_bp
from clip_service.http.errors import errors_bp
from clip_service.http.limits import MULTIPART_OVERHEAD, body_limits
from clip_service.http.logs import configure_logging, install_request_logging
from clip_service.http.openapi import openapi_bp
from clip_service.http.page import page_bp
from clip_service.http.search import search_bp
from clip_service.http.status import status_bp
from clip_service.service import ClipService
from clip_service.settings import Settings

__all__ = ["MULTIPART_OVERHEAD", "InMemoryRequest", "create_app"]


class InMemoryRequest(Request):
    """Keeps uploads in memory (never spooled to disk); MAX_CONTENT_LENGTH bounds their size."""

    def _get_file_stream(self, total_content_length, content_type, filename=None,
                         content_length=None):
        return io.BytesIO()


def create_app(settings: Settings, engine: Engine | None = None) -> Flask:
    """A ready-to-serve app; the model (unless `engine` is given) loads in the background."""
    configure_logging(settings.log_level, settings.log_format)
    app = Flask(__name__, static_folder=None)  # the page is served by page.py, with its headers
    app.request_class = InMemoryRequest
    limits = body_limits(settings)
    app.config["MAX_CONTENT_LENGTH"] = limits.one_image
    app.json.ensure_ascii = False  # emoji as characters, not \u escapes
    app.json.sort_keys = False
    service = ClipService(settings, engine=engine)
    app.extensions[EXTENSION] = service
    install_request_logging(app)  # first: its clock must start before any other hook runs

    @app.before_request
    def _body_limit():  # the routes that take several images may have a larger body
        request.max_content_length = limits.for_request(request.path, request.mimetype)

    app.register_blueprint(errors_bp)  # then the UTF-8 check, before access control
    app.register_blueprint(analyze_bp)
    app.register_blueprint(embed_bp)
    app.register_blueprint(search_bp)
    app.register_blueprint(status_bp)
    install_access_control(app, settings.api_key, settings.cors_origins, settings.answered_hosts)
    app.register_blueprint(page_bp)
    if settings.trusted_proxies:  # behind nginx: log and rate the real client, not the proxy
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxies)
    app.register_blueprint(openapi_bp)
    service.start()
    return app
