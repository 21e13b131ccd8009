"""How much memory one worker's decodes may hold at once (DECODE_MEMORY_MB), shared by every request.

MAX_IMAGE_PIXELS bounds one image; this bounds them together. A small file can claim 60 megapixels of
16-bit grey, and sixteen such uploads at once held 5 GB. Each decode reserves its peak, estimated from
the header before any pixel is allocated, and holds it until the image has become the model's small
input. One that cannot get its share waits, but only while it could still finish before its deadline;
then it is refused (503, retry shortly). One that needs more than the whole budget can never run (413).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from clip_service.errors import Overloaded, TooLarge

MB = 1 << 20
# What a decode of `peak` bytes is assumed to take before any has been timed: about half of what one
# busy core did (360 MB of 16-bit grey PNG in 1.9 s), so waiting stops early rather than late.
FIRST_BYTES_PER_SECOND = 100 * MB


class DecodeBudget:
    """Bytes reserved by the decodes in progress, at most `total`; smaller decodes may pass larger
    ones that are waiting (a photo is not held up behind a bomb)."""

    def __init__(self, total: int):
        self.total = total
        self._used = 0
        self._rate = float(FIRST_BYTES_PER_SECOND)  # bytes of estimate decoded per second, as timed
        self._changed = threading.Condition()

    def __reduce__(self):
        """Sent to another process (a Ray actor of `index --ray`), a budget is one of the same size of
        that process's own: what it bounds is the memory of the decodes running there."""
        return DecodeBudget, (self.total,)

    @property
    def used(self) -> int:
        return self._used

    def seconds_for(self, cost: int) -> float:
        """How long a decode of this estimate is expected to take, from those timed so far."""
        return cost / self._rate

    @contextlib.contextmanager
    def reserved(self, cost: int, deadline: float | None = None, what: str = "This image") -> Iterator[None]:
        """Hold `cost` bytes while the block runs; wait for them while there is still time to decode.

        `deadline` is time.monotonic() based (None: wait as long as it takes, as `tag` and `index` do).
        """
        if cost > self.total:
            raise TooLarge(f"{what} needs about {-(-cost // MB)} MB of memory to decode; the limit is "
                           f"{self.total // MB} MB per worker (DECODE_MEMORY_MB); send a smaller image")
        start_by = None if deadline is None else deadline - self.seconds_for(cost)
        with self._changed:
            while self._used + cost > self.total:
                left = None if start_by is None else start_by - time.monotonic()
                if left is not None and left <= 0:
                    raise Overloaded(f"Other images are being decoded ({self._used // MB} MB of "
                                     f"DECODE_MEMORY_MB={self.total // MB} in use) and this one could not "
                                     "start in time to finish before REQUEST_TIMEOUT; retry shortly")
                self._changed.wait(left)
            self._used += cost
        started = time.monotonic()
        try:
            yield
        finally:
            seconds = time.monotonic() - started
            with self._changed:
                self._used -= cost
                if cost >= 16 * MB and seconds > 0:  # small decodes' times are mostly overhead
                    self._rate = 0.7 * self._rate + 0.3 * (cost / seconds)
                self._changed.notify_all()
