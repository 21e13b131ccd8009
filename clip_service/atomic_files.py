"""Files that readers see whole or not at all: the label-feature cache and the photo index.

Each is written to a temporary file beside it and renamed over it (a rename within one folder is
atomic), so a reader, another worker or a crash mid-write never meets half a file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """`write(temporary path)`, then rename it over `path`; the temporary file never outlives this call.

    Errors (OSError from a full or read-only disk, or the writer's own) reach the caller, and `path`
    keeps what it held.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
