"""How large a request body may be, by route: derived from the settings in this one place.

Flask (each request's max_content_length) and gunicorn's front door (before it reads a body) both ask
`BodyLimits.for_request`, so the door refuses with 413 exactly what the app would, without reading it.
Routes that take several images in one multipart body (`many_files` in http/routes.py) may carry
BATCH_FILES_MAX of them; a JSON body (/embed's texts) is never an image and is sized by the text budget;
every other body holds at most one image.
"""

from __future__ import annotations

from dataclasses import dataclass

from clip_service.http.options import MAX_LABEL_CHARACTERS, MAX_REQUEST_LABELS
from clip_service.http.routes import MANY_FILES_PATHS
from clip_service.settings import Settings

MULTIPART_OVERHEAD = 64 * 1024  # part headers, boundaries and option fields around the image bytes
# The most texts a request may have, every character written as a \uXXXX\uXXXX pair, plus the keys:
# parsing more than that (a 8 MB list of nothing) would cost hundreds of megabytes before the 400.
JSON_BODY_MAX = MAX_REQUEST_LABELS * MAX_LABEL_CHARACTERS * 12 + 4096


@dataclass(frozen=True)
class BodyLimits:
    """Largest request body, in bytes: one image, or BATCH_FILES_MAX images in one multipart body."""

    one_image: int
    many_images: int
    json: int = JSON_BODY_MAX

    def for_request(self, path: str, media_type: str) -> int:
        """`media_type`: the Content-Type without parameters, lower case."""
        return self._limit(path, media_type)[0]

    def described(self, path: str, media_type: str) -> str:
        """What the request's limit is made of, for the 413's message."""
        return self._limit(path, media_type)[1]

    def _limit(self, path: str, media_type: str) -> tuple[int, str]:
        if media_type == "application/json":
            return self.json, f"a JSON body holds at most {MAX_REQUEST_LABELS} texts"
        if media_type == "multipart/form-data" and path in MANY_FILES_PATHS:
            return self.many_images, "BATCH_FILES_MAX times MAX_IMAGE_BYTES, plus form overhead"
        return self.one_image, "MAX_IMAGE_BYTES, plus form overhead"


def body_limits(settings: Settings) -> BodyLimits:
    one = settings.max_image_bytes + MULTIPART_OVERHEAD
    return BodyLimits(one, settings.batch_files_max * settings.max_image_bytes + MULTIPART_OVERHEAD)
