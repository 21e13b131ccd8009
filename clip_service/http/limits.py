"""How large a request body may be, by route: derived from the settings in this one place.

Flask (each request's max_content_length) and gunicorn's front door (before it reads a body) both ask
`BodyLimits.for_request`, so the door refuses with 413 exactly what the app would, without reading it.
Routes that take several images in one multipart body (`/analyze/batch`, `/embed`) may carry
BATCH_FILES_MAX of them; every other body holds at most one image.
"""

from __future__ import annotations

from dataclasses import dataclass

from clip_service.settings import Settings

MULTIPART_OVERHEAD = 64 * 1024  # part headers, boundaries and option fields around the image bytes
MANY_FILES_PATHS = frozenset({"/analyze/batch", "/embed"})


@dataclass(frozen=True)
class BodyLimits:
    """Largest request body, in bytes: one image, or BATCH_FILES_MAX images in one multipart body."""

    one_image: int
    many_images: int

    def for_request(self, path: str, multipart: bool) -> int:
        return self.many_images if multipart and path in MANY_FILES_PATHS else self.one_image


def body_limits(settings: Settings) -> BodyLimits:
    one = settings.max_image_bytes + MULTIPART_OVERHEAD
    return BodyLimits(one, settings.batch_files_max * settings.max_image_bytes + MULTIPART_OVERHEAD)
