"""The web page for people at GET /: a static page, its stylesheet and its script, calling /analyze.

Everything is served from clip_service/http/static/ by this module (the app has no general /static/ route,
create_app turns it off), so the page works offline and behind any proxy, with nothing fetched from
other hosts. The headers tell the browser so: the Content-Security-Policy lets the page run only this
service's own script and style files (no inline code, so an injected tag could not run), talk only to
this service (connect-src 'self'), show only its own, data: and blob: images (the preview of a chosen
file is a blob: URL; a pasted URL is fetched by the service, never by the browser), and never be framed
by another page (frame-ancestors 'none', against clickjacking).
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, send_file

STATIC_DIR = Path(__file__).resolve().parent / "static"
PAGE = STATIC_DIR / "index.html"
ASSETS = {"page.css": "text/css", "page.js": "text/javascript"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src 'self' data: blob:; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'none'",
    "X-Frame-Options": "DENY",
}

page_bp = Blueprint("page", __name__)


def _served(path: Path, mimetype: str):
    response = send_file(path, mimetype=mimetype)
    response.headers.update(SECURITY_HEADERS)
    return response


@page_bp.get("/")
def index():
    return _served(PAGE, "text/html")


def _asset_route(name: str, mimetype: str) -> None:
    """One route per file: no path from a request ever reaches the file system."""
    endpoint = "asset_" + name.replace(".", "_")
    page_bp.add_url_rule(f"/static/{name}", endpoint, lambda: _served(STATIC_DIR / name, mimetype))


for _name, _mimetype in ASSETS.items():
    _asset_route(_name, _mimetype)
