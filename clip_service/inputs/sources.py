"""The three ways a request brings an image (upload, `file=`, `url=`), each read, timed and decoded.

Decoding uses the model's input size when one is loaded, so a JPEG decodes at the smallest scale
that still covers it (see images.decode_image).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from PIL import Image

from clip_service import metrics
from clip_service.errors import DeadlineExceeded
from clip_service.inputs.images import ImageLimits, check_file_access, decode_image, read_file
from clip_service.inputs.url_fetch import UrlFetcher
from clip_service.settings import Settings


class ImageSources:
    """Upload bytes, a server path or a URL -> an RGB image, within the settings' limits."""

    def __init__(self, settings: Settings, draft_size: Callable[[], tuple[int, int] | None] = lambda: None):
        self.settings = settings
        self.limits = ImageLimits(settings.max_image_bytes, settings.max_image_pixels)
        self.fetcher = UrlFetcher(settings.max_image_bytes, settings.url_timeout, settings.url_allowlist)
        self.draft_size = draft_size  # the loaded model's (H, W) input, None before it loads

    def from_upload(self, data: bytes, deadline: float | None = None) -> Image.Image:
        return self._decode(data, deadline)

    def from_file(self, raw_path: str, deadline: float | None = None) -> Image.Image:
        real = check_file_access(raw_path, self.settings.allowed_file_roots, self.settings.private)
        with metrics.timed("fetch"):
            data = read_file(raw_path, real, self.limits.max_bytes, self.settings.allowed_file_roots)
        return self._decode(data, deadline)

    def from_url(self, url: str, deadline: float | None = None) -> Image.Image:
        with metrics.timed("fetch"):
            data = self.fetcher.fetch(url, deadline)
        return self._decode(data, deadline)

    def _decode(self, data: bytes, deadline: float | None) -> Image.Image:
        """Decoding is the costly step: none starts once the request's time is up."""
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded("The request's time ran out before its image could be decoded "
                                   f"(REQUEST_TIMEOUT={self.settings.request_timeout:g} s)")
        with metrics.timed("decode"):
            return decode_image(data, self.limits, self.draft_size())
