"""The web page for people at GET /: one self-contained HTML file that calls /analyze from the browser.

The page is a static file in clip_service/http/static/ with its CSS and JavaScript inline, so it works offline
and behind any proxy, with nothing fetched from other hosts. The headers say so to the browser: the
Content-Security-Policy lets the page talk only to this service (connect-src 'self'), show only its own,
data: and blob: images (the preview of a chosen file is a blob: URL; a pasted URL is fetched by the
service, never by the browser), and run only its own inline style and script. nosniff stops a browser
from guessing another type for the response.

The app has no /static/ route (create_app turns it off), so this is the only way to the file.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, send_file

STATIC_DIR = Path(__file__).resolve().parent / "static"
PAGE = STATIC_DIR / "index.html"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'unsafe-inline'; "
                               "script-src 'unsafe-inline'; connect-src 'self'",
    "X-Content-Type-Options": "nosniff",
}

page_bp = Blueprint("page", __name__)


@page_bp.get("/")
def index():
    response = send_file(PAGE, mimetype="text/html")
    response.headers.update(SECURITY_HEADERS)
    return response
