"""Reading a library's images ahead of the model: the server's reading and decoding, on worker threads.

Reading and decoding a camera JPEG takes about as long as classifying it; doing it ahead (Pillow and
file reads release the GIL) keeps the model busy.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from PIL import Image

from clip_service.cores import MAX_THREADS
from clip_service.errors import ServiceError
from clip_service.inputs.images import ImageLimits, decode_image, read_file

# Decoding and preparing (Pillow releases the GIL) on every core, as the server's requests do, at least 2
DECODE_WORKERS = max(2, min(os.cpu_count() or 1, MAX_THREADS))
DECODE_AHEAD = 4

T = TypeVar("T")
R = TypeVar("R")


def read_image(path: Path, limits: ImageLimits, draft_size: tuple[int, int] | None = None,
               beneath: Path | None = None, prepare: Callable[[Image.Image], R] | None = None,
               ) -> tuple[Image.Image | R | None, str | None]:
    """(image, None), or (None, why not): the server's file reading and decoding, same limits and
    (when `limits` has one) the same decode budget, held until `prepare` has made the model's input.

    draft_size is the model's input size, as the server passes it (JPEGs decode at a reduced scale
    that still covers it), so a photo gets the same pixels, and tags, here as there. With `beneath`
    (a resolved folder) a path that leads out of it, by a symlink or one swapped in while reading, is
    not read: the index command's vectors and thumbnails are served, and must show only that folder.
    """
    try:
        if beneath is None:
            data = read_file(str(path), path, limits.max_bytes)
        else:  # as file= is read: the resolved path, opened beneath the folder (a link swapped in later)
            real = path.resolve()
            if not real.is_relative_to(beneath):
                return None, "a link out of the folder (not indexed: searching would reveal what it shows)"
            data = read_file(str(path), real, limits.max_bytes, (beneath,))
        return decode_image(data, limits, draft_size, prepare), None
    except ServiceError as error:
        return None, error.message
    except Exception as error:  # a decoder bug on one odd file must not end a library run
        return None, f"{type(error).__name__}: {error}"


def prefetch(function: Callable[[T], R], items: Iterable[T], workers: int = DECODE_WORKERS,
             ahead: int = DECODE_AHEAD) -> Iterator[tuple[T, R]]:
    """(item, function(item)) in order, computing the next few items on threads meanwhile.

    The window is bounded, so memory holds at most `ahead` results however large the library is.
    """
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tag-read")
    window: deque = deque()
    try:
        for item in items:
            window.append((item, pool.submit(function, item)))
            if len(window) >= ahead:
                first, future = window.popleft()
                yield first, future.result()
        while window:
            first, future = window.popleft()
            yield first, future.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
