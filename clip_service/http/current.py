"""The ClipService behind the app handling the current request (create_app puts it there).

Light on purpose: gunicorn.conf.py imports it in the master, which must not import the service (that
would register the master's own metric samples, a clip_healthy of 0 that /metrics shows for good).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import current_app, request

from clip_service.http.routes import ARRIVED_KEY

if TYPE_CHECKING:
    from clip_service.service import ClipService

EXTENSION = "clip_service"  # its key in app.extensions


def current_service() -> ClipService:
    return current_app.extensions[EXTENSION]


def admitted():
    """A place among MAX_QUEUE for the current request, with its deadline counted from its arrival
    (the front door says when that was): `with admitted() as deadline:`."""
    return current_service().admission.admitted(request.environ.get(ARRIVED_KEY))
