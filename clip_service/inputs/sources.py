"""The three ways a request brings an image (upload, `file=`, `url=`), each read, timed and decoded.

Decoding uses the model's input size when one is loaded, so a JPEG decodes at the smallest scale
that still covers it (see images.decode_image).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from PIL import Image

from clip_service import metrics
from clip_service.errors import DeadlineExceeded, ServiceError
from clip_service.inputs.images import ImageLimits, check_file_access, decode_image, read_file
from clip_service.inputs.url_fetch import UrlFetcher
from clip_service.runtime.cores import map_on_cores
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

    def decode_each(self, uploads: list[bytes], deadline: float | None = None,
                    prepare: Callable[[Image.Image], Any] | None = None) -> list[Any | ServiceError]:
        """Each upload's image (or `prepare(image)`), or the error that upload alone caused, decoded in
        parallel; the deadline covers them all.

        With `prepare` (the engine's: an image -> its small model input) each image is prepared on the
        thread that decoded it and dropped at once, so a request of 32 large PNGs holds at most one
        full-size image per core, not 32 of them (about 180 MB each at MAX_IMAGE_PIXELS).
        """
        def outcome(data: bytes) -> Any | ServiceError:
            try:
                image = self._decode(data, deadline)
            except DeadlineExceeded:
                raise
            except ServiceError as error:
                return error
            return image if prepare is None else prepare(image)

        return map_on_cores(outcome, uploads)

    def from_uploads(self, uploads: list[bytes], deadline: float | None = None,
                     prepare: Callable[[Image.Image], Any] | None = None) -> list[Any]:
        """Several uploads of one request; one that fails fails them all, its message saying which."""
        outcomes = self.decode_each(uploads, deadline, prepare)
        for number, outcome in enumerate(outcomes, 1):
            if isinstance(outcome, ServiceError):
                if len(outcomes) == 1:
                    raise outcome
                raise type(outcome)(f"file {number} of {len(outcomes)}: {outcome.message}")
        return outcomes

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
