"""A folder that keeps turning into a symlink to somewhere else: the check-then-open race of `file=`."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def flipping_to_a_symlink(folder: Path, elsewhere: Path) -> Iterator[None]:
    """While inside, `folder` is swapped, again and again, for a symlink to `elsewhere` and back."""
    parked = folder.with_name(folder.name + ".parked")
    stop = threading.Event()

    def flip():
        while not stop.is_set():
            os.rename(folder, parked)
            os.symlink(elsewhere, folder)
            os.unlink(folder)
            os.rename(parked, folder)
            stop.wait(0.001)  # the real folder for a moment, so reads also succeed

    flipper = threading.Thread(target=flip)
    flipper.start()
    try:
        yield
    finally:
        stop.set()
        flipper.join()
