"""The ClipService behind the app handling the current request (create_app puts it there)."""

from __future__ import annotations

from flask import current_app

from clip_service.service import ClipService

EXTENSION = "clip_service"  # its key in app.extensions


def current_service() -> ClipService:
    return current_app.extensions[EXTENSION]
