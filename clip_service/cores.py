"""One request's per-image CPU work (decoding, resizing) spread over the cores.

A request with many images (/analyze/batch, /embed) would otherwise decode and resize them one after
another on its own thread while the other cores, and the model, wait. Pillow releases the GIL while
it decodes and resizes, so threads run these steps in parallel.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

MAX_THREADS = 8


def map_on_cores(function: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """[function(item) for item in items], in order, on up to one thread per core; the first exception
    raised is raised here (after the others finish)."""
    threads = min(len(items), os.cpu_count() or 1, MAX_THREADS)
    if threads <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(threads, thread_name_prefix="clip-images") as pool:
        return list(pool.map(function, items))
