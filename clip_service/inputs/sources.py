"""The three ways a request brings an image (upload, `file=`, `url=`), each as bytes, and the one step
that decodes and prepares them all.

Decoding uses the model's input size when one is loaded, so a JPEG decodes at the smallest scale
that still covers it (see images.decode_image).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from PIL import Image

from clip_service import metrics
from clip_service.cores import map_on_cores
from clip_service.errors import DeadlineExceeded, ServiceError
from clip_service.inputs.images import ImageLimits, check_file_access, decode_image, read_file
from clip_service.inputs.url_fetch import UrlFetcher
from clip_service.settings import Settings


class ImageSources:
    """Where a request's images come from (upload bytes, a server path, a URL), each as bytes, and the
    one step that makes bytes the model's input, within the settings' limits and the decode budget."""

    def __init__(self, settings: Settings, draft_size: Callable[[], tuple[int, int] | None] = lambda: None):
        self.settings = settings
        self.limits = ImageLimits.of(settings)
        self.fetcher = UrlFetcher(settings.max_image_bytes, settings.url_timeout, settings.url_allowlist)
        self.draft_size = draft_size  # the loaded model's (H, W) input, None before it loads

    def file_bytes(self, raw_path: str) -> bytes:
        real = check_file_access(raw_path, self.settings.allowed_file_roots, self.settings.private)
        with metrics.timed("fetch"):
            return read_file(raw_path, real, self.limits.max_bytes, self.settings.allowed_file_roots)

    def url_bytes(self, url: str, deadline: float | None = None) -> bytes:
        with metrics.timed("fetch"):
            return self.fetcher.fetch(url, deadline)

    def prepare_each(self, images: list[bytes], deadline: float | None = None,
                     prepare: Callable[[Image.Image], Any] | None = None) -> list[Any | ServiceError]:
        """Each image's `prepare(image)` (the engine's: an image -> its small model input; without it
        the RGB image), or the error that image alone caused, in parallel; the deadline covers them all.

        Each image is prepared on the thread that decoded it and dropped at once, under its share of
        the decode budget, so a request of 32 large PNGs holds at most one full-size image per core,
        and all the requests of a worker together at most DECODE_MEMORY_MB.
        """
        def outcome(data: bytes) -> Any | ServiceError:
            try:
                return self._decode(data, deadline, prepare)
            except DeadlineExceeded:
                raise
            except ServiceError as error:
                return error

        return map_on_cores(outcome, images)

    def prepare_all(self, images: list[bytes], deadline: float | None = None,
                    prepare: Callable[[Image.Image], Any] | None = None) -> list[Any]:
        """As prepare_each, but one image that fails fails them all, its message saying which."""
        outcomes = self.prepare_each(images, deadline, prepare)
        for number, outcome in enumerate(outcomes, 1):
            if isinstance(outcome, ServiceError):
                if len(outcomes) == 1:
                    raise outcome
                raise type(outcome)(f"file {number} of {len(outcomes)}: {outcome.message}")
        return outcomes

    def _decode(self, data: bytes, deadline: float | None, prepare: Callable[[Image.Image], Any] | None,
                ) -> Any:
        """Decoding is the costly step: none starts once the request's time is up."""
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded("The request's time ran out before its image could be decoded "
                                   f"(REQUEST_TIMEOUT={self.settings.request_timeout:g} s)")
        with metrics.timed("decode"):
            return decode_image(data, self.limits, self.draft_size(), prepare, deadline)
